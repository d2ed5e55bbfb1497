"""Sharded forward passes on 8 virtual CPU devices equal the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imitax import models, sharding

# Every mesh shape on the LLaMA family (GQA, the most sharding-sensitive); one
# shape each for the other families, to keep the suite fast on 2 cores.
CASES = [
    ("llama", "fsdp=8,tensor=1"),
    ("llama", "fsdp=4,tensor=2"),
    ("llama", "fsdp=2,tensor=4"),
    ("gpt2", "data=2,fsdp=2,tensor=2"),
    ("gpt_neox", "fsdp=2,tensor=4"),
]


def tiny_configs():
    common = dict(vocab_size=256, hidden_size=64, num_layers=2, mlp_dim=128, max_position_embeddings=64)
    return {
        "llama": models.LlamaConfig(num_heads=8, num_kv_heads=4, head_dim=8, **common),
        "gpt2": models.GPT2Config(num_heads=4, num_kv_heads=4, head_dim=16, **{**common, "vocab_size": 250}),
        "gpt_neox": models.GPTNeoXConfig(num_heads=8, num_kv_heads=8, head_dim=8, **common),
    }


def _shard_fraction(spec, mesh) -> int:
    n = 1
    for axes in spec:
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            n *= mesh.shape[axis]
    return n


@pytest.mark.parametrize("family, spec", CASES)
def test_sharded_forward_matches_single_device(family, spec):
    assert jax.device_count() == 8
    cfg = tiny_configs()[family]
    model = models.init_model(cfg, seed=1)
    tokens = jax.random.randint(jax.random.key(0), (8, 24), 0, cfg.vocab_size)
    expected = np.asarray(model(tokens))
    graphdef, state = nnx.split(model)

    mesh = sharding.make_mesh(spec)
    sharded = jax.device_put(state, sharding.state_shardings(state, mesh))
    with jax.set_mesh(mesh):
        tokens_sharded = jax.device_put(tokens, sharding.batch_sharding(mesh))
        logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(sharded, tokens_sharded)
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)

    # Each device holds 1/N of each parameter, N = product of the mesh axes it is sharded over.
    n_sharded = 0
    for leaf in jax.tree.leaves(sharded):
        n = _shard_fraction(leaf.sharding.spec, mesh)
        n_sharded += n > 1
        for shard in leaf.addressable_shards:
            assert shard.data.size * n == leaf.size
    # The big matrices really are split, on every mesh (a test that cannot fail is a bug).
    assert n_sharded >= 8


def test_sharded_init_equals_unsharded_init():
    cfg = tiny_configs()["llama"]
    plain = nnx.state(models.init_model(cfg, seed=3))
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    sharded = nnx.state(models.init_model(cfg, mesh=mesh, seed=3))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = sharded["layers"]["attn"]["q_proj"]["kernel"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_indivisible_dimension_stays_replicated():
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    # 250 is not divisible by tensor=4: the vocab dim stays whole, the embed dim is still split.
    spec = sharding.logical_to_spec(("vocab", "embed"), (250, 64), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharding.logical_to_spec(("vocab", "embed"), (256, 64), mesh) == jax.sharding.PartitionSpec("tensor", "fsdp")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fsdp=3", "asks for 3 devices"),
        ("fsdp=-1,tensor=-1", "at most one axis may be -1"),
        ("fsdp=-1,tensor=3", "not divisible"),
        ("model=2", "unknown axes"),
        ("fsdp", "expected 'axis=size'"),
    ],
)
def test_mesh_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(spec)


def test_mesh_spec_wildcard():
    mesh = sharding.make_mesh("data=2,fsdp=-1")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_activation_constraint_is_noop_without_mesh():
    x = jnp.ones((4, 8))
    assert sharding.constrain(x, ("act_batch", "act_embed")) is x
