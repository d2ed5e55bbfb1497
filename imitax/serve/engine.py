"""Continuous batching over the KV cache: requests join and leave a fixed set of cache slots between steps.

>>> engine = Engine(model, tokenizer, max_batch=16, max_len=2048)
>>> engine.warmup(); engine.start()
>>> handle = engine.submit(prompt_ids, SamplingParams(max_tokens=32, temperature=0.0))
>>> for event in handle: ...          # TokenEvents; the last one of each choice has finish_reason set
>>> engine.stop()

The cache (the model's own layout, ``[layers, slots, kv_heads, positions, head_dim]``) has
``max_batch`` rows (slots). A request (each of its ``n`` choices) takes a free slot, reads its
prompt in chunks of ``chunk`` tokens, then decodes one token per step until it stops; its slot
then takes the next waiting request. Each step of the engine thread runs

* a **prefill** of one chunk for each of up to ``prefill_rows`` slots still reading their
  prompts (those slots gathered from the cache, run, written back), so a long prompt takes
  several steps and delays the decoding slots by one chunk's time per step, never more;
* one **decode** step of every slot at once: the model's :meth:`~imitax.models.Transformer.extend`
  with one token per slot, as :func:`imitax.eval.generate.generate` decodes.

All slots write at one shared cache position, the index, which a decode step advances by one
(slots that are not decoding write a padding entry there). A slot starting a prompt of ``n``
tokens takes the ``ceil(n / chunk)`` chunks just *before* the index for it (its previous
request's entries, dead; the first chunk left-padded), so a new prompt costs the other slots no
positions. Every request has its own segment id, so its attention reads its own entries only:
nothing is cleared when a slot changes hands, and a request's greedy output does not depend on
what else is in flight (up to float rounding of sums over differently placed entries). When the
index reaches the end, the cache is **compacted**: every slot's entries move left by the same
amount (a roll over the position axis, one pass), which the ``headroom`` positions bound to at
most once per ``headroom`` steps.

Compiled programs: decode, compaction, and a prefill per row-count bucket (1, 2, 4, ... up to
``prefill_rows``) at the fixed chunk length: ``2 + len(buckets)`` in all, whatever the requests
(:attr:`Engine.programs`; :meth:`Engine.warmup` compiles them before the first request). The
index and the sampling settings are arguments, not constants of the programs.

Sampling is per slot (temperature, top-k, top-p, seed, logit bias, presence and frequency
penalties), with the filters of :mod:`imitax.eval.generate`; the vocabulary is sorted for the
filters only in steps where some slot samples with them. As in vLLM, the logit bias is added
first, then the penalties are subtracted (``logits[t] -= presence * (count[t] > 0) + frequency *
count[t]``, ``count`` the times the choice has generated ``t``), then a greedy slot takes the
argmax and a sampling one applies temperature and filters. The settings are per-slot arrays
of fixed shapes (a logit bias is :data:`MAX_LOGIT_BIAS` ``(id, value)`` pairs, the counts a
``[slots, vocab]`` array that stays on the device and that the decode step updates), so no
request compiles a program. Each token comes back with its log-probability and, when some slot
asks, the :data:`TOP_LOGPROBS` most likely tokens; both are of the model's own distribution,
before bias, penalties, temperature and filters, as vLLM reports them by default
(``logprobs_mode="raw_logprobs"``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imitax.eval.generate import sample_logits
from imitax.models import Transformer
from imitax.models.transformer import constrain_cache

__all__ = [
    "MAX_LOGIT_BIAS",
    "TOP_LOGPROBS",
    "Engine",
    "EngineBusy",
    "EngineError",
    "Handle",
    "SamplingParams",
    "TokenEvent",
]

TOP_LOGPROBS = 20  # the most the OpenAI API returns per token (``top_logprobs`` <= 20)
MAX_LOGIT_BIAS = 300  # the most logit_bias entries a request may give (the decode step's fixed array width)

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A request the engine cannot serve (too long, bad sampling settings); the message says why."""


class EngineBusy(EngineError):
    """Too many requests in flight: the same request may succeed later (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Attributes:
      max_tokens: the most new tokens (``None``: until the context is full).
      temperature: 0 decodes greedily; above 0 samples from ``softmax(logits / temperature)``.
      top_p, top_k: nucleus and top-k filters (1.0 and 0 keep every token).
      stop: strings that end the output (not included in it).
      seed: the random seed of the first choice (choice ``i`` uses ``seed + i``); ``None``: a fresh one.
      n: how many choices (each decoded in its own slot).
      ignore_eos: keep going past the end-of-text token (benchmarks).
      logprobs: return the :data:`TOP_LOGPROBS` most likely tokens with each token (the
        chosen token's log-probability comes back always).
      logit_bias: token id -> a value in [-100, 100] added to its logit before sampling (at most
        :data:`MAX_LOGIT_BIAS` entries), as the OpenAI API defines it.
      presence_penalty, frequency_penalty: in [-2, 2]; each step subtracts
        ``presence_penalty * (count[t] > 0) + frequency_penalty * count[t]`` from the logit of
        every token ``t`` the choice has generated ``count[t]`` times (the prompt not counted).
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    logprobs: bool = False
    logit_bias: Mapping[int, float] = dataclasses.field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def check(self) -> None:
        """Raises :class:`EngineError` for settings no request may have."""
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EngineError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.n < 1:
            raise EngineError(f"n must be >= 1, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:  # also refuses NaN
                raise EngineError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise EngineError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
        for token, bias in self.logit_bias.items():
            if token < 0:
                raise EngineError(f"logit_bias key {token} is not a token id (ids are >= 0)")
            if not -100.0 <= bias <= 100.0:
                raise EngineError(f"logit_bias value for token {token} must be in [-100, 100], got {bias}")


@dataclasses.dataclass
class TokenEvent:
    """One step's news for one choice: new text (stop strings held back), and the finish reason at the end.

    ``tokens`` (ids), ``logprobs`` (each chosen token's log-probability) and ``top`` (for each
    token, ``(ids, logprobs)`` of the :data:`TOP_LOGPROBS` most likely) are aligned; ``text`` is
    the decoded text that became final with them (it may lag the tokens by a few characters
    while a stop string or a multi-byte character could still be forming).
    """

    choice: int
    text: str
    tokens: list[int]
    logprobs: list[float]
    top: list[tuple[list[int], list[float]]]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0


class Handle:
    """A submitted request: iterate it (blocking) for its :class:`TokenEvent` s, or give it a callback."""

    def __init__(self, n: int, prompt_tokens: int, on_event=None):
        self.n, self.prompt_tokens = n, prompt_tokens
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._on_event = on_event or self._events.put
        self._open = n
        self.cancelled = False

    def emit(self, event: TokenEvent) -> None:
        self._on_event(event)

    def cancel(self) -> None:
        """Frees the request's slots at the next step (the client went away)."""
        self.cancelled = True

    def __iter__(self) -> Iterator[TokenEvent]:
        while self._open:
            event = self._events.get()
            self._open -= event.finish_reason is not None
            yield event


@dataclasses.dataclass
class _Slot:
    """A choice in a cache slot: its prompt, what it has generated and how to go on."""

    handle: Handle
    choice: int
    prompt: list[int]
    params: SamplingParams
    limit: int  # the most new tokens
    seed: int
    uid: int  # the slot's segment id: no other request's cache entries match it
    filled: int = 0  # prompt tokens written, then every token written
    region: int | None = None  # the cache position of its prompt's first chunk (once prefill starts)
    generated: list[int] = dataclasses.field(default_factory=list)
    pending: int | None = None  # the last sampled token, not yet in the cache
    sent: int = 0  # characters of text already emitted

    @property
    def prefilling(self) -> bool:
        return self.filled < len(self.prompt)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# The batch (slot) axis of each cache entry (Transformer.init_cache's layout).
_SLOT_AXIS = {"k": 1, "v": 1, "segment_ids": 0, "positions": 0}
_POSITION_AXIS = {"k": 3, "v": 3, "segment_ids": 1, "positions": 1}


# -- the compiled programs ------------------------------------------------------------------------


class _Settings(NamedTuple):
    """Each row's sampling settings as the programs take them: arrays of fixed shapes, whatever the requests."""

    temperature_b: np.ndarray
    top_k_b: np.ndarray
    top_p_b: np.ndarray
    seeds_b: np.ndarray
    counts_b: np.ndarray  # tokens generated so far (the sampling key's step)
    want_top: np.ndarray  # some row asks for the top log-probabilities
    bias_ids_bk: np.ndarray  # logit_bias as MAX_LOGIT_BIAS (id, value) pairs; padding (0, 0.0)
    bias_bk: np.ndarray
    presence_b: np.ndarray
    frequency_b: np.ndarray


def _pick(logits_bv, sampling: _Settings, penalty_bv=None):
    """Per-row tokens (greedy where the temperature is 0), their log-probabilities and the top ones.

    The tokens are picked from the logits plus each row's logit bias minus ``penalty_bv`` (the
    presence and frequency penalties); the log-probabilities are of the model's own logits.
    Sampling (two sorts of the vocabulary per row for top-k and top-p) and the top
    log-probabilities run only when some row asks for them (``lax.cond``): a greedy step
    without logprobs costs an argmax and a log-sum-exp.
    """
    temperature_b, top_k_b, top_p_b, seeds_b, counts_b = sampling[:5]
    raw_bv = logits_bv.astype(jnp.float32)
    rows_b1 = jnp.arange(raw_bv.shape[0])[:, None]
    adjusted_bv = raw_bv.at[rows_b1, sampling.bias_ids_bk].add(sampling.bias_bk)  # padding adds 0 to token 0
    if penalty_bv is not None:
        adjusted_bv = adjusted_bv - penalty_bv
    greedy_b = jnp.argmax(adjusted_bv, axis=-1).astype(jnp.int32)

    def sample(logits_v, temperature, top_k, top_p, seed, count, filtered: bool):
        key = jax.random.fold_in(jax.random.key(seed), count)
        scaled_v = logits_v / jnp.where(temperature > 0, temperature, 1.0)
        if filtered:
            return sample_logits(key, scaled_v[None], 1.0, top_k, top_p)[0]
        return jax.random.categorical(key, scaled_v).astype(jnp.int32)

    def sampled():
        args = (adjusted_bv, temperature_b, top_k_b, top_p_b, seeds_b, counts_b)
        tokens_b = jax.lax.cond(
            jnp.any((top_k_b > 0) | (top_p_b < 1.0)),
            lambda: jax.vmap(functools.partial(sample, filtered=True))(*args),
            lambda: jax.vmap(functools.partial(sample, filtered=False))(*args),
        )
        return jnp.where(temperature_b > 0, tokens_b, greedy_b)

    token_b = jax.lax.cond(jnp.any(temperature_b > 0), sampled, lambda: greedy_b)
    logz_b = jax.nn.logsumexp(raw_bv, axis=-1)
    chosen_b = jnp.take_along_axis(raw_bv, token_b[:, None], axis=-1)[:, 0] - logz_b
    k = min(TOP_LOGPROBS, raw_bv.shape[-1])

    def top():
        values, ids = jax.lax.top_k(raw_bv, k)
        return ids, values - logz_b[:, None]

    empty = (jnp.zeros((raw_bv.shape[0], k), jnp.int32), jnp.zeros((raw_bv.shape[0], k), jnp.float32))
    top_ids, top_vals = jax.lax.cond(sampling.want_top, top, lambda: empty)
    return token_b, chosen_b, top_ids, top_vals


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnums=(3,))
def _prefill_step(
    graphdef, state, layer_params, cache, index, rows_p, tokens_pc, positions_pc, segment_ids_pc, sampling
):
    """One prompt chunk for the slots ``rows_p``, written at cache position ``index`` (a row equal to the batch
    size is padding: never written); picks a token from each chunk's last position (used where it ends a prompt)."""
    model = nnx.merge(graphdef, state)
    sub = {name: jnp.take(cache[name], rows_p, axis=_SLOT_AXIS[name], mode="clip") for name in _SLOT_AXIS}
    h_pce, sub = model.hidden(
        tokens_pc, positions_pc, segment_ids_pc, {**sub, "index": index}, layer_params=layer_params
    )
    picked = _pick(model.logits(h_pce[:, -1:])[:, 0], sampling)  # nothing generated yet: no penalties
    new = {
        name: cache[name].at[(slice(None),) * axis + (rows_p,)].set(sub[name], mode="drop")
        for name, axis in _SLOT_AXIS.items()
    }
    return new, picked


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnums=(3, 4))
def _decode_step(
    graphdef, state, layer_params, cache, seen_bv, index, tokens_b, positions_b, segment_ids_b, fresh_b, sampling
):
    """Every slot writes one token at ``index`` (segment 0 where it is not decoding) and picks the next.

    ``seen_bv`` counts each slot's generated tokens for the penalties: a decoding slot adds the
    token it feeds in (its last generated one), after clearing its row where ``fresh_b`` (its
    first decode step: the row still counts an earlier request's tokens).
    """
    model = nnx.merge(graphdef, state)
    cache = {**cache, "index": index}
    logits_b1v, cache = model.extend(
        tokens_b[:, None], cache, positions_b[:, None], segment_ids_b[:, None], layer_params=layer_params
    )
    cache = constrain_cache(cache)
    seen_bv = jnp.where(fresh_b[:, None], 0, seen_bv)
    seen_bv = seen_bv.at[jnp.arange(seen_bv.shape[0]), tokens_b].add((segment_ids_b != 0).astype(seen_bv.dtype))
    counts_bv = seen_bv.astype(jnp.float32)
    penalty_bv = sampling.presence_b[:, None] * (seen_bv > 0) + sampling.frequency_b[:, None] * counts_bv
    return {name: cache[name] for name in _SLOT_AXIS}, seen_bv, _pick(logits_b1v[:, 0], sampling, penalty_bv)


@functools.partial(jax.jit, donate_argnums=(0,))
def _compact(cache, index, shift):
    """Moves every slot's cache positions ``shift`` to the left; what wraps around is marked padding."""
    new = {name: jnp.roll(cache[name], -shift, axis=axis) for name, axis in _POSITION_AXIS.items()}
    length = new["segment_ids"].shape[1]
    new["segment_ids"] = jnp.where(jnp.arange(length)[None] < index - shift, new["segment_ids"], 0)
    return new


# -- the engine -------------------------------------------------------------------------------------


class Engine:
    """Serves token-level requests from a thread that steps a fixed batch of KV-cache slots.

    Args:
      model: the language model.
      tokenizer: its ``transformers`` tokenizer (decodes text for stop strings and streaming).
      max_batch: cache slots, i.e. choices decoded at once; more wait in a queue.
      max_len: the longest prompt plus output of one request (capped at a learned-position
        model's ``max_position_embeddings``).
      chunk: prompt tokens per slot and prefill step.
      prefill_rows: the most slots one prefill step reads prompts for.
      max_waiting: choices that may wait for a slot when all are busy; :meth:`submit` refuses
        more (HTTP 429).
      eos_token_ids: tokens that end a choice (default: the tokenizer's EOS).
      headroom: cache positions beyond the most one request can span: the cache is compacted
        (every slot's entries moved left, one pass over it) at most once per ``headroom``
        decode steps (default: ``max(64, max_len // 4)``).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        max_batch: int = 16,
        max_len: int = 2048,
        chunk: int = 128,
        prefill_rows: int = 4,
        max_waiting: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        headroom: int | None = None,
    ):
        cfg = model.cfg
        if max_batch < 1 or max_len < 2 or chunk < 1:
            raise ValueError(f"need max_batch >= 1, max_len >= 2 and chunk >= 1, got {max_batch}, {max_len}, {chunk}")
        if cfg.position == "learned" and max_len > cfg.max_position_embeddings:
            log.warning("max_len %d capped at the model's %d learned positions", max_len, cfg.max_position_embeddings)
            max_len = cfg.max_position_embeddings
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_len, self.chunk = max_batch, max_len, min(chunk, max_len)
        self.max_waiting = 4 * max_batch if max_waiting is None else max_waiting
        eos = tokenizer.eos_token_id if eos_token_ids is None else eos_token_ids
        self.eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.buckets = tuple(1 << i for i in range(max(1, min(prefill_rows, max_batch)).bit_length()))
        self.graphdef, self.state = nnx.split(model)
        # On the CPU, each layer's weights as arrays of their own, read by every step (the model's
        # decoding_layers: one more copy of the layers' weights, for as long as the engine lives).
        self.layer_params = jax.jit(lambda state: nnx.merge(self.graphdef, state).decoding_layers())(self.state)
        # A slot's entries span at most its prompt rounded up to chunks, a step per chunk and its
        # output; the headroom past that sets how often the cache is compacted.
        span = self.max_len + self.chunk + -(-self.max_len // self.chunk)
        self.length = span + (max(64, self.max_len // 4) if headroom is None else max(1, headroom))
        cache = model.init_cache(max_batch, self.length)
        # Committed to where the parameters are, as the programs' outputs are: the first request
        # then finds the programs that warmup compiled (an uncommitted input is another signature).
        where = jax.tree.leaves(self.state)[0].sharding
        if not isinstance(where, jax.sharding.SingleDeviceSharding):
            where = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
        self.cache = jax.device_put({name: cache[name] for name in _SLOT_AXIS}, where)
        # How often each slot's choice has generated each token (the penalties); rows are cleared
        # by the decode step when a slot starts decoding a new choice.
        self.seen = jax.device_put(jnp.zeros((max_batch, cfg.vocab_size), jnp.int32), where)
        self.index = 0  # the next write position, shared by every slot (passed to the programs)
        self._uids = itertools.count(1)
        self.slots: list[_Slot | None] = [None] * max_batch
        self.waiting: list[_Slot] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = self.compactions = 0

    @property
    def programs(self) -> list[str]:
        """The compiled programs the engine runs (decode, compaction, a prefill per row bucket)."""
        return ["decode", "compact"] + [f"prefill rows={p} chunk={self.chunk}" for p in self.buckets]

    @staticmethod
    def compiled() -> int:
        """How many programs the engine functions have compiled in this process (every engine in it)."""
        return sum(f._cache_size() for f in (_prefill_step, _decode_step, _compact))

    def warmup(self) -> None:
        """Compiles every program before the first request; writes nothing any request will read."""
        for p in self.buckets:  # rows all padding: nothing written
            rows = [self.max_batch] * p
            zeros = np.zeros((p, self.chunk), np.int32)
            self.cache, _ = _prefill_step(
                self.graphdef, self.state, self.layer_params, self.cache, np.int32(0), np.array(rows, np.int32),
                zeros, zeros, zeros,
                self._sampling(rows),
            )  # fmt: skip
        zeros = np.zeros((self.max_batch,), np.int32)  # segment 0 everywhere, then moved back
        self.cache, self.seen, picked = _decode_step(
            self.graphdef,
            self.state,
            self.layer_params,
            self.cache,
            self.seen,
            np.int32(0),
            zeros,
            zeros,
            zeros,
            np.zeros((self.max_batch,), bool),
            self._sampling([self.max_batch] * self.max_batch),
        )
        self.cache = _compact(self.cache, np.int32(1), np.int32(1))
        jax.block_until_ready(picked)

    # -- requests ---------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_event=None) -> Handle:
        """Queues a request; its events go to ``on_event`` (called from the engine thread) or the handle.

        Raises:
          EngineError: bad settings, an empty or too long prompt, or (:class:`EngineBusy`) a full queue.
        """
        params.check()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise EngineError("the prompt is empty")
        vocab = self.model.cfg.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise EngineError(f"prompt token ids must be in [0, {vocab})")
        if any(t >= vocab for t in params.logit_bias):
            raise EngineError(f"logit_bias keys must be token ids in [0, {vocab}), got {max(params.logit_bias)}")
        room = self.max_len - len(prompt)
        if room < 1:
            raise EngineError(f"the prompt has {len(prompt)} tokens; this server's context is {self.max_len}")
        if params.max_tokens is not None and params.max_tokens > room:
            raise EngineError(
                f"max_tokens {params.max_tokens} plus the prompt's {len(prompt)} tokens exceed this server's context "
                f"of {self.max_len} tokens; ask for at most {room}"
            )
        seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1) if params.seed is None else params.seed
        handle = Handle(params.n, len(prompt), on_event)
        limit = params.max_tokens or room
        capacity = self.max_batch + self.max_waiting
        if params.n > capacity:
            raise EngineError(f"n={params.n} is more than this server holds at once ({capacity})")
        with self._lock:
            if self._stopping:
                raise EngineError("the server is shutting down")
            if len(self.waiting) + sum(s is not None for s in self.slots) + params.n > capacity:
                raise EngineBusy(f"too many requests in flight (at most {capacity} choices); retry later")
            for i in range(params.n):
                uid = next(self._uids) % (2**31 - 1) + 1
                self.waiting.append(_Slot(handle, i, prompt, params, limit, (seed + i) & 0x7FFFFFFF, uid))
            self._lock.notify()
        return handle

    def in_flight(self) -> int:
        with self._lock:
            return len(self.waiting) + sum(s is not None for s in self.slots)

    # -- the thread ---------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="imitax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True) -> None:
        """Refuses new requests; with ``drain`` finishes the ones in flight, else aborts them; joins the thread."""
        with self._lock:
            self._stopping = True
            if not drain:
                for slot in self.waiting + [s for s in self.slots if s is not None]:
                    slot.handle.cancel()
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self.waiting and all(s is None for s in self.slots) and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self.waiting and all(s is None for s in self.slots):
                    return
                self._admit()
            try:
                self.step()
            except Exception:  # a failed step must not leave clients waiting forever
                log.exception("engine step failed")
                for i, slot in enumerate(self.slots):
                    if slot is not None:
                        self._finish(i, "abort")

    def _admit(self) -> None:
        for i, slot in enumerate(self.slots):
            if slot is None and self.waiting:
                self.slots[i] = self.waiting.pop(0)

    def step(self) -> None:
        """Prompt chunks (for up to ``prefill_rows`` slots) and one decode step (if any slot is decoding).

        Every slot writes at the shared index ``self.index``: a decode step writes one token
        per slot there (segment 0 for slots not decoding: never read), and a slot starting its
        prompt gets the ``ceil(n / chunk)`` chunks before the index, its own dead entries
        (its earlier requests' segment ids match no one). Slots that start together with equal
        chunk counts share those positions and are prefilled together.
        """
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.handle.cancelled:
                self._finish(i, "abort")
        for start, rows in self._prefill_groups():
            self._prefill(start, rows)
        decoding = [i for i, s in enumerate(self.slots) if s is not None and s.pending is not None]
        if decoding:
            self._decode(decoding)
        self.steps += 1

    def _prefill_groups(self) -> list[tuple[int, list[int]]]:
        """This step's prompt chunks: ``(cache position, slots)``, slots that started first first."""
        live = [(i, s) for i, s in enumerate(self.slots) if s is not None and s.prefilling]
        live = sorted(live, key=lambda item: item[1].region is None)[: self.buckets[-1]]
        for _, slot in live:
            if slot.region is None:
                need = _round_up(len(slot.prompt), self.chunk)
                if self.index < need:  # the other slots skip the positions in between
                    self.index = need
                slot.region = self.index - need
        groups: dict[int, list[int]] = {}
        for i, slot in live:
            offset = slot.region + _round_up(slot.filled, self.chunk) if slot.filled else slot.region
            groups.setdefault(offset, []).append(i)
        return sorted(groups.items())

    def _make_room(self) -> None:
        """Compacts the cache when no position is left for a decode step."""
        if self.index < self.length:
            return
        starts = [s.region for s in self.slots if s is not None and s.region is not None]
        shift = self.index - min(starts, default=self.index)
        if shift == 0:
            raise RuntimeError("KV cache full: no slot can be moved (a bug: the cache length covers a whole request)")
        self.cache = _compact(self.cache, np.int32(self.index), np.int32(shift))
        self.index -= shift
        self.compactions += 1
        for slot in self.slots:
            if slot is not None and slot.region is not None:
                slot.region -= shift

    def _sampling(self, rows: Sequence[int]) -> _Settings:
        """The programs' per-row settings, fixed shapes whatever the requests (padding rows: greedy)."""
        slots = [self.slots[i] if i < self.max_batch else None for i in rows]
        params = [s.params if s is not None else SamplingParams(temperature=0.0) for s in slots]
        bias_ids, bias = (
            np.zeros((len(rows), MAX_LOGIT_BIAS), np.int32),
            np.zeros((len(rows), MAX_LOGIT_BIAS), np.float32),
        )
        for j, p in enumerate(params):
            bias_ids[j, : len(p.logit_bias)] = list(p.logit_bias.keys())
            bias[j, : len(p.logit_bias)] = list(p.logit_bias.values())
        return _Settings(
            np.array([p.temperature for p in params], np.float32),
            np.array([p.top_k for p in params], np.int32),
            np.array([p.top_p for p in params], np.float32),
            np.array([s.seed if s else 0 for s in slots], np.uint32),
            np.array([len(s.generated) if s else 0 for s in slots], np.int32),
            np.bool_(any(s is not None and s.params.logprobs for s in slots)),
            bias_ids,
            bias,
            np.array([p.presence_penalty for p in params], np.float32),
            np.array([p.frequency_penalty for p in params], np.float32),
        )

    def _prefill(self, start: int, rows: list[int]) -> None:
        """One chunk for each of ``rows`` at cache position ``start``; a first chunk is left-padded."""
        p = next(b for b in self.buckets if b >= len(rows))
        padded = rows + [self.max_batch] * (p - len(rows))
        c = self.chunk
        tokens, positions, segment_ids = (np.zeros((p, c), np.int32) for _ in range(3))
        for j, i in enumerate(rows):
            slot = self.slots[i]
            pad = _round_up(len(slot.prompt), c) - len(slot.prompt) if slot.filled == 0 else 0
            part = slot.prompt[slot.filled : slot.filled + c - pad]
            tokens[j, pad:] = part
            positions[j, pad:] = np.arange(slot.filled, slot.filled + len(part))
            segment_ids[j, pad:] = slot.uid
            slot.filled += len(part)
        self.cache, picked = _prefill_step(
            self.graphdef, self.state, self.layer_params, self.cache, np.int32(start), np.array(padded, np.int32),
            tokens, positions, segment_ids, self._sampling(padded),
        )  # fmt: skip
        self._deliver([i for i in rows if not self.slots[i].prefilling], padded, picked)

    def _decode(self, rows: list[int]) -> None:
        self._make_room()
        tokens, positions, segment_ids = (np.zeros((self.max_batch,), np.int32) for _ in range(3))
        fresh = np.zeros((self.max_batch,), bool)
        for i in rows:
            slot = self.slots[i]
            tokens[i], positions[i], segment_ids[i] = slot.pending, slot.filled, slot.uid
            fresh[i] = len(slot.generated) == 1
        self.cache, self.seen, picked = _decode_step(
            self.graphdef, self.state, self.layer_params, self.cache, self.seen, np.int32(self.index), tokens,
            positions, segment_ids, fresh, self._sampling(range(self.max_batch)),
        )  # fmt: skip
        self.index += 1
        for i in rows:
            self.slots[i].filled += 1
        self._deliver(rows, range(self.max_batch), picked)

    def _deliver(self, rows: Sequence[int], order: Sequence[int], picked) -> None:
        """Hands each row its new token (``order``: which slot each row of ``picked`` belongs to)."""
        token_b, chosen_b, top_ids, top_vals = (np.asarray(a) for a in jax.device_get(picked))
        where = {i: j for j, i in enumerate(order)}
        for i in rows:
            j = where[i]
            slot = self.slots[i]
            token = int(token_b[j])
            slot.generated.append(token)
            slot.pending = token
            self._advance(i, token, float(chosen_b[j]), (top_ids[j].tolist(), top_vals[j].tolist()))

    def _advance(self, i: int, token: int, logprob: float, top) -> None:
        """Emits the text that became final with ``token``; ends the choice on eos, a stop string or its limit."""
        slot = self.slots[i]
        finish = None
        text_tokens = slot.generated
        if token in self.eos_ids and not slot.params.ignore_eos:
            finish, text_tokens = "stop", slot.generated[:-1]
        text = self.tokenizer.decode(text_tokens, skip_special_tokens=True)
        found = (text.find(s, max(0, slot.sent - len(s))) for s in slot.params.stop)
        cut = min((k for k in found if k >= 0), default=-1)
        if cut >= 0:
            finish, text = "stop", text[:cut]
        elif finish is None and (len(slot.generated) >= slot.limit or slot.filled + 1 >= self.max_len):
            finish = "length"
        if finish is None:
            # Hold back a partial character and anything that may begin a stop string.
            safe = len(text.rstrip("\ufffd"))
            for s in slot.params.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
            text = text[:safe]
        new_text, slot.sent = text[slot.sent :], max(slot.sent, len(text))
        slot.handle.emit(
            TokenEvent(slot.choice, new_text, [token], [logprob], [top], finish, prompt_tokens=len(slot.prompt))
        )
        if finish is not None:
            self.slots[i] = None

    def _finish(self, i: int, reason: str) -> None:
        slot = self.slots[i]
        self.slots[i] = None
        slot.handle.emit(TokenEvent(slot.choice, "", [], [], [], reason, prompt_tokens=len(slot.prompt)))
