"""The train state: parameters, optimizer state, step and RNG, sharded by the rules table.

Every function takes ``trainable``, the NNX filter of the parameters the state trains:
``nnx.Param`` (all of them) or ``nnx.LoRAParam`` (the adapters of a LoRA run, whose base
weights stay outside the state, frozen and without optimizer moments).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx.filterlib import Filter

from imitax import sharding
from imitax.models import Transformer


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position (which is ``step``).

    Attributes:
      step: the number of optimizer updates applied (int32 scalar).
      params: the trained parameters as a nested dict (``nnx.State.to_pure_dict``).
      opt_state: the Optax state.
      rng: raw key data (``jax.random.key_data``) for stochastic layers; raw so
        that Orbax stores it as a plain uint32 array.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def param_shardings(model: Transformer, mesh: jax.sharding.Mesh, trainable: Filter = nnx.Param) -> dict:
    """``NamedSharding`` per parameter (a nested dict like the params)."""
    state = nnx.state(model, trainable)
    return sharding.state_shardings(state, mesh).to_pure_dict()


def state_shardings(
    abstract_model: Transformer,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    trainable: Filter = nnx.Param,
) -> TrainState:
    """Shardings of the whole train state: optimizer moments follow their parameters."""
    p_shardings = param_shardings(abstract_model, mesh, trainable)
    abstract_params = nnx.state(abstract_model, trainable).to_pure_dict()
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    replicated = sharding.replicated(mesh)
    # Param-shaped moments take their parameter's sharding; anything else (counts,
    # unfactored Adafactor's placeholder row/column statistics) is replicated.
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda leaf, s, p: s if leaf.shape == p.shape else replicated,
        abstract_opt,
        p_shardings,
        abstract_params,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(step=replicated, params=p_shardings, opt_state=opt_shardings, rng=replicated)


def create_train_state(
    model: Transformer,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    seed: int,
    trainable: Filter = nnx.Param,
) -> TrainState:
    """A fresh train state around ``model``'s parameters, placed on ``shardings``."""
    params = nnx.state(model, trainable).to_pure_dict()

    def init(params):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(jax.random.key(seed)),
        )

    return jax.jit(init, out_shardings=shardings)(params)


def abstract_train_state(
    model: Transformer, optimizer: optax.GradientTransformation, shardings: TrainState, trainable: Filter = nnx.Param
):
    """The train state's shapes, dtypes and shardings, with nothing allocated (for restores)."""
    params = nnx.state(model, trainable).to_pure_dict()

    def init(params):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(jax.random.key(0)),
        )

    shapes = jax.eval_shape(init, params)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
