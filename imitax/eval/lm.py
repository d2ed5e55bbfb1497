"""The language-model interface every evaluation task talks to (the lm-evaluation-harness's three calls).

>>> lm = LM.from_path("workdir")                      # or an imitax checkpoint, or an HF model directory
>>> lm.loglikelihood([("The capital of France is", " Paris")])     # [(logprob, is_greedy)]
>>> lm.loglikelihood_rolling(["a held-out document"])              # [logprob]
>>> lm.generate_until([("Q: 2+2?\\nA:", {"until": ["\\n"], "max_gen_toks": 8})])   # [" 4"]

Tasks see only these three methods (and ``tokenizer``), so any model that
implements them can be evaluated.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from imitax import convert
from imitax.eval import encoding, scoring
from imitax.eval.generate import generate
from imitax.models import Transformer

__all__ = ["GENERATION_KEYS", "LM"]

# The keys a generate_until request's settings may hold.
GENERATION_KEYS = ("until", "max_gen_toks", "temperature", "top_p", "top_k", "seed", "do_sample")
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default


class LM:
    """A model and its tokenizer behind the harness's ``loglikelihood``/``loglikelihood_rolling``/``generate_until``.

    Args:
      model: the language model.
      tokenizer: its ``transformers`` tokenizer.
      mesh: shard batches over this mesh's batch axes (default: the mesh set
        with ``jax.set_mesh``, if any).
      batch_size: rows per forward pass and prompts per generation batch.
      max_length: the longest input the model reads: scored requests are
        truncated from the left to it, generation prompts to it less
        ``max_gen_toks`` (default: the model's ``max_position_embeddings``; a
        longer one is refused for learned positions, warned about for RoPE).
      add_bos_token: the lm-evaluation-harness's ``add_bos_token``, for scoring
        and generation prompts alike. ``None`` (default, the harness's default
        since 0.4.9.2): the tokenizer's default special tokens (BOS for LLaMA
        tokenizers, nothing for GPT-2's); ``False`` (the harness's default up to
        0.4.9.1): none; ``True``: always BOS. An empty context is the prefix
        token (BOS, else EOS) in every case. The tokenizer itself is not changed.
      **scorer_kwargs: more :class:`~imitax.eval.scoring.Scorer` options
        (``prefix_token_id``, ``share_prefix``, ``min_shared_prefix``).

    Raises:
      ValueError: ``max_length`` past a learned-position model's positions, or
        ``add_bos_token=True`` with a tokenizer that has no BOS token.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        mesh: jax.sharding.Mesh | None = None,
        batch_size: int = scoring.DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        **scorer_kwargs,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.scorer = scoring.Scorer(
            model,
            tokenizer,
            max_length=max_length,
            batch_size=batch_size,
            mesh=mesh,
            add_bos_token=add_bos_token,
            **scorer_kwargs,
        )
        self.mesh, self.batch_size, self.max_length = self.scorer.mesh, batch_size, self.scorer.max_length

    @classmethod
    def from_path(cls, path: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None, **kwargs) -> LM:
        """Loads a model and its tokenizer from an imitax checkpoint, a training workdir or an HF directory.

        Args:
          path: an imitax checkpoint (``params/`` and ``model_config/``), a
            training workdir (its newest ``checkpoints/<step>/``; the tokenizer
            from ``WORKDIR/tokenizer``), or a Hugging Face model directory
            (``config.json`` and ``*.safetensors``, converted on the fly).
          mesh: load the parameters straight into their shards on this mesh.
          **kwargs: ``dtype`` (parameter dtype for loading) and the other
            arguments of :class:`LM`.

        Raises:
          FileNotFoundError: ``path`` does not exist.
          ValueError: ``path`` is none of the accepted kinds, or it has no tokenizer.
        """
        import transformers  # Imported here: loading it takes seconds.

        dtype = kwargs.pop("dtype", None)
        path = pathlib.Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such model directory")
        kind = convert.require_model_kind(path, where="model")  # the one resolver of model paths
        if kind == "hf":
            model = convert.load_hf(path, mesh=mesh, dtype=dtype)
            tokenizer_dir = path
        else:
            model = convert.load_checkpoint(path, mesh=mesh, dtype=dtype)
            tokenizer_dir = convert.tokenizer_dir(path)
            if tokenizer_dir is None:
                raise ValueError(
                    f"{path} has no tokenizer (looked for tokenizer/ in the checkpoint and in the training "
                    "workdir): re-create the checkpoint with scripts/convert.py, which copies it"
                )
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
        return cls(model, tokenizer, mesh=mesh, **kwargs)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and a rolling window's start) is conditioned on."""
        return self.scorer.prefix_token_id

    @property
    def add_bos_token(self) -> bool | None:
        """The harness's ``add_bos_token`` this LM encodes with (``None``: the tokenizer's default)."""
        return self.scorer.add_bos_token

    @property
    def stats(self) -> scoring.ScoringStats:
        """The scorer's cumulative statistics (requests, truncations, compiled programs...)."""
        return self.scorer.stats

    def loglikelihood(self, requests: Sequence[tuple[str, str]], progress: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` for each ``(context, continuation)``."""
        return self.scorer.loglikelihood(requests, progress=progress)

    def loglikelihood_rolling(self, texts: Sequence[str], progress: bool = False) -> list[float]:
        """The log-probability of each whole text (rolling windows over ``max_length``)."""
        return self.scorer.loglikelihood_rolling(texts, progress=progress)

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]], progress: bool = False) -> list[str]:
        """Continues each context; returns the text before the first stop string (which is excluded).

        Each request's settings: ``until`` (a stop string or a list of them;
        the end-of-text token always stops), ``max_gen_toks`` (default 256),
        optional ``temperature`` (default 0: greedy; ``do_sample=False`` forces
        0), ``top_p``, ``top_k`` and ``seed``. As the harness does, the context
        is encoded as ``add_bos_token`` says (default: the tokenizer's default
        special tokens) and truncated from the left to ``max_length -
        max_gen_toks`` tokens, and the new tokens are decoded without special
        tokens. Requests with equal settings are generated together,
        ``batch_size`` at a time. When sampling, every request draws its own
        sample (copies of one request give independent samples, e.g. for
        pass@k), and a rerun with the same seed repeats them.
        ``progress`` shows a tqdm bar over the requests.

        Raises:
          ValueError: unknown settings, or ``max_gen_toks >= max_length``.
        """
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, (_, kwargs) in enumerate(requests):
            s = self._generation_settings(kwargs)
            settings.append(s)
            groups.setdefault(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in s.items()), []).append(i)
        eos = self.tokenizer.eos_token_id
        prefix = self.scorer.prefix_token_id
        bar = tqdm.tqdm(total=len(requests), desc="generating", disable=not progress, leave=False)
        for index in groups.values():
            s = settings[index[0]]
            keep = self.max_length - s["max_gen_toks"]
            contexts = encoding.tok_encode(
                self.tokenizer, [requests[i][0] for i in index], prefix, add_bos_token=self.add_bos_token
            )
            # Longest first, as the harness orders generation.
            order = sorted(range(len(index)), key=lambda j: -len(contexts[j]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                prompts = [contexts[j][-keep:] or [prefix] for j in chunk]
                new_tokens = generate(
                    self.model,
                    prompts,
                    max_new_tokens=s["max_gen_toks"],
                    temperature=s["temperature"],
                    top_k=s["top_k"],
                    top_p=s["top_p"],
                    eos_token_id=eos,
                    pad_token_id=self.tokenizer.pad_token_id or 0,
                    # Each batch its own stream: copies of one request in different batches must differ.
                    seed=int(np.random.SeedSequence([s["seed"], start]).generate_state(1)[0] >> 1),
                    mesh=self.mesh,
                )
                for j, tokens in zip(chunk, new_tokens, strict=True):
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    for stop in s["until"]:
                        if stop:
                            text = text.split(stop)[0]
                    results[index[j]] = text
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _generation_settings(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(kwargs) - set(GENERATION_KEYS)
        if unknown:
            raise ValueError(f"unknown generation settings {sorted(unknown)}; known: {', '.join(GENERATION_KEYS)}")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen_toks = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        if not 0 < max_gen_toks < self.max_length:
            raise ValueError(f"max_gen_toks must be in [1, max_length={self.max_length}), got {max_gen_toks}")
        temperature = float(kwargs.get("temperature", 0.0))
        if kwargs.get("do_sample") is False:
            temperature = 0.0
        return {
            "until": until,
            "max_gen_toks": max_gen_toks,
            "temperature": temperature,
            "top_p": float(kwargs.get("top_p", 1.0)),
            "top_k": int(kwargs.get("top_k", 0)),
            "seed": int(kwargs.get("seed", 0)),
        }
