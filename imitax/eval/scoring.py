"""Log-likelihood scoring with the lm-evaluation-harness's semantics; shared prompt prefixes are computed once.

>>> scorer = Scorer(model, tokenizer, batch_size=8)
>>> scorer.loglikelihood([("Question: 2+2=?\\nAnswer:", " 4")])   # [(log p(" 4" | context), is_greedy)]
>>> scorer.loglikelihood_rolling(["a whole document"])            # [log p(document)]

Semantics (those of the harness's ``hf`` backend, version 0.4):

* Each request is encoded by the harness's rules, kept in :mod:`imitax.eval.encoding`
  (trailing whitespace, BOS, empty contexts, rolling perplexity windows).
* The model reads ``(context + continuation)[-(max_length + 1):][:-1]``: a
  request longer than ``max_length + 1`` tokens is truncated from the left (and
  counted in :class:`ScoringStats`). The result is the summed log-probability
  of the continuation's tokens and whether each is the argmax (greedy) token.
  ``max_length`` defaults to the model's ``max_position_embeddings`` (the
  harness reads it from the config); a longer one is refused for learned
  positions, which have no embedding there (:meth:`TransformerConfig.check_length`).

How the work is arranged. Requests are reduced to distinct model inputs
("rows"): requests whose inputs are equal (a multiple-choice question's choices
" A".." D" differ only in the last, predicted token) share one forward pass.
Rows are then sorted by their tokens, and runs of rows that share a long
common *token* prefix (a 5-shot MMLU subject: the description and five solved
examples, ~84% of every prompt) form a group. Rows truncated from the left
share a prefix only with rows whose window starts at the same token (they are
grouped then: a key or value depends on every token before it and on its
position, so nothing else is exactly reusable); the rest run plainly.

Groups go in waves of eight, sorted by prefix length: a wave's prefixes are
computed chunk by chunk into one KV cache (a row per group), and
its suffixes are scored in batches sorted by length *across* its groups, each
row reading its own group's cache row, with positions continuing its own
prefix. Rows are left-padded (so the scored positions are the last slots of
every row) to one of a few widths chosen per call to pad least (at most four
for plain rows, six for suffixes, from a fixed ladder), so a whole benchmark
compiles a bounded number of programs; :attr:`Scorer.stats` counts them. Only
the scored positions are projected onto the vocabulary, and the log-softmax is
computed in float32.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils

from imitax import sharding
from imitax.eval.encoding import (  # noqa: F401  (the scorer's public names, as before the split)
    check_add_bos_token,
    encode_pair,
    encode_requests,
    resolve_prefix_token_id,
    rolling_windows,
    tok_encode,
)
from imitax.models import Transformer
from imitax.models.transformer import constrain_cache

__all__ = [
    "Scorer",
    "ScoringStats",
    "check_add_bos_token",
    "encode_pair",
    "length_bucket",
    "resolve_prefix_token_id",
    "rolling_windows",
    "tok_encode",
]

DEFAULT_BATCH_SIZE = 8
# Positions projected onto the vocabulary at once: bounds the [batch, chunk, vocab] logits.
_VOCAB_CHUNK = 32
# Shared prefixes are computed in chunks of this many tokens (one program per cache length).
_PREFIX_CHUNK = 128
# Prefix groups whose caches are held at once ("a wave"): their suffixes share batches, sorted by
# length across groups, so a batch is padded to rows of nearly equal length.
# Memory: the wave's cache, [layers, 8, kv_heads, cache length, head_dim] keys and values.
_WAVE_GROUPS = 8
# The most distinct row widths per call of the plain rows and of the suffixes: each width is one more
# compiled program (seconds), each coarser one more padding; the widths are chosen per call to pad least.
_MAX_PLAIN_WIDTHS = 4
_MAX_SUFFIX_WIDTHS = 6
# Batches dispatched ahead of the one being read back (JAX dispatches asynchronously).
_IN_FLIGHT = 2


# -- shapes ---------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def length_bucket(n: int) -> int:
    """Rounds a sequence length up: multiples of 32 up to 512, then eight buckets per power of two.

    Padding wastes fewer than 32 tokens up to 512 and at most an eighth above
    (a 5-shot MMLU question's suffix after the shared prefix is ~140 tokens,
    where coarser buckets wasted a third of the work), and lengths up to 4096
    fall into 40 buckets, of which a benchmark meets a handful.
    """
    if n <= 512:
        return max(32, _round_up(n, 32))
    step = 2 ** (math.ceil(math.log2(n)) - 4)
    return _round_up(n, step)


def _window_bucket(n: int) -> int:
    """Scored positions per row: 1 (one-token continuations), 16, then a length bucket (never above the row's).

    Coarse at the bottom on purpose: each bucket is another compiled program,
    and projecting a few unneeded positions onto the vocabulary costs little.
    """
    return 1 if n == 1 else 16 if n <= 16 else length_bucket(n)


def choose_widths(lengths: Sequence[int], max_widths: int) -> list[int]:
    """At most ``max_widths`` length buckets that pad ``lengths`` least, each padded to the smallest one >= it.

    The widths come from a fixed ladder (multiples of 16 up to 256, then
    :func:`length_bucket`'s), so that calls with similar lengths reuse their
    programs; among the rungs the lengths fall on, a dynamic program keeps the
    ``max_widths`` that minimize the total padding. Always includes the
    largest length's rung. (5-shot MMLU suffixes after the shared prefix are
    ~70 tokens: 32-token steps padded them by a third.)
    """
    lengths = sorted(int(n) for n in lengths)
    candidates = sorted({_round_up(n, 16) if n <= 256 else length_bucket(n) for n in lengths})
    if len(candidates) <= max_widths:
        return candidates
    sums = np.concatenate([[0], np.cumsum(lengths)])

    def padding(low: int, high: int) -> int:  # the lengths in (low, high], padded to high
        a, b = bisect.bisect_right(lengths, low), bisect.bisect_right(lengths, high)
        return (b - a) * high - int(sums[b] - sums[a])

    n = len(candidates)
    # cost[c][j]: least padding of the lengths <= candidates[j] with c + 1 widths, the largest candidates[j].
    cost = [[padding(0, candidates[j]) for j in range(n)]]
    back: list[list[int]] = [[-1] * n]
    for _ in range(1, max_widths):
        row, links = [], []
        for j in range(n):
            best = min(((cost[-1][i] + padding(candidates[i], candidates[j]), i) for i in range(j)), default=None)
            row.append(best[0] if best else math.inf)
            links.append(best[1] if best else -1)
        cost.append(row)
        back.append(links)
    c = min(range(max_widths), key=lambda c: cost[c][n - 1])
    chosen, j = [], n - 1
    while j >= 0:
        chosen.append(candidates[j])
        j, c = back[c][j], c - 1
    return sorted(chosen)


def _width(widths: Sequence[int], n: int) -> int:
    """The smallest of ``widths`` (sorted) that holds ``n`` tokens."""
    return widths[bisect.bisect_left(widths, n)]


def _pow2(n: int) -> int:
    return 2 ** math.ceil(math.log2(max(n, 1)))


def _candidates_bucket(n: int) -> int:
    """Distinct last tokens per row: a power of 4 (1 for most requests, 4 for A-D questions)."""
    return 4 ** math.ceil(math.log(n, 4) - 1e-9) if n > 1 else 1


# -- the compiled programs ------------------------------------------------------------------------


def _scores(model: Transformer, h_bwe, targets_bw, cands_bk):
    """Log-probabilities of ``targets`` at every scored position, argmax tokens, and candidates at the last one.

    Returns:
      ``(target_logprobs [b, w], greedy [b, w], candidate_logprobs [b, k])``.
    """

    def chunk(h_bce, targets_bc):
        logits_bcv = model.logits(h_bce)  # float32
        lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
        target_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0] - lse_bc
        return target_bc, jnp.argmax(logits_bcv, axis=-1).astype(jnp.int32), logits_bcv[:, -1], lse_bc[:, -1]

    b, w, e = h_bwe.shape
    if w <= _VOCAB_CHUNK:
        target_bw, greedy_bw, last_bv, last_lse_b = chunk(h_bwe, targets_bw)
    else:  # Windows above 32 are length buckets or row widths: multiples of 32, or of 16 up to 256.
        c = math.gcd(w, _VOCAB_CHUNK)
        n = w // c
        h_nbce = h_bwe.reshape(b, n, c, e).swapaxes(0, 1)
        t_nbc = targets_bw.reshape(b, n, c).swapaxes(0, 1)
        target_nbc, greedy_nbc, last_nbv, last_lse_nb = jax.lax.map(lambda x: chunk(*x), (h_nbce, t_nbc))
        target_bw = target_nbc.swapaxes(0, 1).reshape(b, w)
        greedy_bw = greedy_nbc.swapaxes(0, 1).reshape(b, w)
        last_bv, last_lse_b = last_nbv[-1], last_lse_nb[-1]
    cands_bk = jnp.take_along_axis(last_bv, cands_bk, axis=-1) - last_lse_b[:, None]
    return target_bw, greedy_bw, cands_bk


@functools.partial(jax.jit, static_argnames=("graphdef", "window"))
def _score_plain(graphdef, state, tokens_bt, positions_bt, segment_ids_bt, targets_bw, cands_bk, *, window):
    """Scores the last ``window`` positions of left-padded rows (no cache)."""
    model = nnx.merge(graphdef, state)
    h_bte, _ = model.hidden(tokens_bt, positions_bt, segment_ids_bt)
    return _scores(model, h_bte[:, -window:], targets_bw, cands_bk)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnums=(2,))
def _extend_prefix(graphdef, state, cache, row, index, tokens_1c, positions_1c, segment_ids_1c):
    """Writes one right-padded chunk of a group's shared prefix into its row of the wave's KV cache.

    One group at a time (not the wave's rows together): prefixes differ in
    length, and a batch of them would run as many chunks for each as for the
    longest (with few groups, most of the prefix work was padding).
    """
    model = nnx.merge(graphdef, state)
    one = {
        "k": jax.lax.dynamic_slice_in_dim(cache["k"], row, 1, axis=1),
        "v": jax.lax.dynamic_slice_in_dim(cache["v"], row, 1, axis=1),
        "segment_ids": jax.lax.dynamic_slice_in_dim(cache["segment_ids"], row, 1, axis=0),
        "positions": jax.lax.dynamic_slice_in_dim(cache["positions"], row, 1, axis=0),
        "index": index,
    }
    # hidden(), not extend(): the prefix's own logits are never needed.
    _, one = model.hidden(tokens_1c, positions_1c, segment_ids_1c, one)
    return {
        "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], one["k"], row, axis=1),
        "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], one["v"], row, axis=1),
        "segment_ids": jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], one["segment_ids"], row, axis=0),
        "positions": jax.lax.dynamic_update_slice_in_dim(cache["positions"], one["positions"], row, axis=0),
        "index": cache["index"],
    }


@functools.partial(jax.jit, static_argnames=("graphdef", "window"))
def _score_suffix(
    graphdef, state, cache, groups_b, index, tokens_bt, positions_bt, segment_ids_bt, targets_bw, cands_bk, *, window
):
    """Scores left-padded suffixes, each written after its own group's prefix in the wave's cache.

    Every row's suffix goes to the slots from ``index`` on (the end of the
    wave's longest prefix); a shorter prefix's padding slots in between have
    segment id 0 and are masked, and the suffix's positions continue its own
    prefix's, so each row sees exactly its prefix followed by its suffix.
    """
    model = nnx.merge(graphdef, state)
    cache = {
        "k": jnp.take(cache["k"], groups_b, axis=1),
        "v": jnp.take(cache["v"], groups_b, axis=1),
        "segment_ids": jnp.take(cache["segment_ids"], groups_b, axis=0),
        "positions": jnp.take(cache["positions"], groups_b, axis=0),
        "index": index,
    }
    h_bte, _ = model.hidden(tokens_bt, positions_bt, segment_ids_bt, constrain_cache(cache))
    return _scores(model, h_bte[:, -window:], targets_bw, cands_bk)


# -- bookkeeping ----------------------------------------------------------------------------------


@dataclasses.dataclass
class ScoringStats:
    """What a :class:`Scorer` did (cumulative; :meth:`since` gives one call's share).

    Attributes:
      requests: ``(context, continuation)`` token requests scored.
      truncated: requests longer than ``max_length + 1`` tokens, truncated from the left.
      rows: distinct model inputs (requests with equal inputs share one).
      input_tokens: tokens of those inputs: what one forward pass per row computes.
      computed_tokens: tokens actually run through the model (each shared prefix once).
      padded_tokens: ``computed_tokens`` plus padding.
      prefix_groups: groups of rows that shared a prefix cache.
      shared_prefix_tokens: tokens of those prefixes (each counted once).
      programs: the program shapes this scorer has run, each one compiled XLA
        program (:meth:`since`: those first run in the span, i.e. compiled then).
      seconds: wall-clock time spent scoring.
    """

    requests: int = 0
    truncated: int = 0
    rows: int = 0
    input_tokens: int = 0
    computed_tokens: int = 0
    padded_tokens: int = 0
    prefix_groups: int = 0
    shared_prefix_tokens: int = 0
    programs: set = dataclasses.field(default_factory=set)
    seconds: float = 0.0

    def copy(self) -> ScoringStats:
        return dataclasses.replace(self, programs=set(self.programs))

    def since(self, earlier: ScoringStats) -> ScoringStats:
        """The work done after ``earlier`` (a :meth:`copy` taken before)."""
        fields = {
            f.name: getattr(self, f.name) - getattr(earlier, f.name)
            for f in dataclasses.fields(self)
            if f.name != "programs"
        }
        return ScoringStats(**fields, programs=self.programs - earlier.programs)

    def to_dict(self) -> dict:
        """JSON-able summary (``programs`` as a count)."""
        out = dataclasses.asdict(self)
        out["programs"] = len(self.programs)
        return out


@dataclasses.dataclass
class _Row:
    """One distinct model input and the requests that read it."""

    tokens: np.ndarray  # int32 [n]
    window: int = 0  # scored positions (the longest continuation among its requests)
    requests: list = dataclasses.field(default_factory=list)  # (request index, continuation tokens)
    candidates: list = dataclasses.field(default_factory=list)  # distinct last continuation tokens

    @property
    def free(self) -> int:
        """Leading tokens whose outputs are not scored: the most a shared prefix may cover."""
        return len(self.tokens) - self.window


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _group_rows(rows: list[_Row], min_prefix: int) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Splits rows into shared-prefix groups ``(prefix_len, row ids)`` and the rest.

    Rows sorted by their tokens put those with long common prefixes side by
    side; a run of them is extended while the work it saves grows: adding a row
    to a group of ``g`` rows whose prefix is ``p`` shrinks the prefix to ``p'``
    and saves work iff ``g * p' > (g - 1) * p``.
    """
    order = sorted(range(len(rows)), key=lambda i: rows[i].tokens.tolist())
    groups, plain = [], []

    def close(members, prefix):
        if len(members) > 1 and prefix >= min_prefix:
            groups.append((prefix, members))
        else:
            plain.extend(members)

    members, prefix = [], 0
    for i in order:
        if members:
            shared = min(prefix, _common_prefix(rows[members[-1]].tokens, rows[i].tokens), rows[i].free)
            if shared >= min_prefix and len(members) * shared > (len(members) - 1) * prefix:
                members.append(i)
                prefix = shared
                continue
            close(members, prefix)
        members, prefix = [i], rows[i].free
    if members:
        close(members, prefix)
    return groups, plain


@dataclasses.dataclass
class _Batch:
    row_ids: list[int]
    tokens_bt: np.ndarray
    positions_bt: np.ndarray
    segment_ids_bt: np.ndarray
    targets_bw: np.ndarray
    cands_bk: np.ndarray
    window: int
    groups_b: np.ndarray | None = None  # each row's group (its prefix's row in the wave's cache)


# -- the scorer -----------------------------------------------------------------------------------


class Scorer:
    """Computes log-likelihoods with a model (see the module docstring for the semantics).

    Args:
      model: the language model.
      tokenizer: a ``transformers`` tokenizer (needed for the text methods only).
      max_length: the longest input the model reads; longer requests are
        truncated from the left. Default: the model's ``max_position_embeddings``,
        as the harness reads it from the config. A longer one is refused for a
        learned-position model (GPT-2: positions past its table have no
        embedding) and warned about for a RoPE model.
      batch_size: rows per forward pass (rounded up to the mesh's batch shards).
      mesh: shard the batch over this mesh's ``data`` and ``fsdp`` axes
        (default: the mesh set with ``jax.set_mesh``, if any).
      prefix_token_id: the token an empty context becomes (default: BOS, else EOS).
      add_bos_token: the harness's ``add_bos_token`` (module docstring).
        ``None`` (default): the tokenizer's default special tokens, as the
        harness's default since 0.4.9.2 (a LLaMA tokenizer's BOS starts every
        context); ``False``: no special tokens, as the harness's default up to
        0.4.9.1; ``True``: always BOS.
      share_prefix: compute each long shared token prefix once (results equal
        the plain computation up to float rounding).
      min_shared_prefix: the shortest prefix worth a cache of its own.

    Raises:
      ValueError: ``max_length`` below 1 or past a learned-position model's
        positions, ``batch_size`` below 1, or a bad ``add_bos_token``.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        *,
        max_length: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        mesh: jax.sharding.Mesh | None = None,
        prefix_token_id: int | None = None,
        add_bos_token: bool | None = None,
        share_prefix: bool = True,
        min_shared_prefix: int = 64,
    ):
        cfg = model.cfg
        self.model, self.tokenizer = model, tokenizer
        if max_length is None:
            self.max_length = int(cfg.max_position_embeddings)
        else:
            if int(max_length) < 1:
                raise ValueError(f"max_length must be >= 1, got {max_length} (scripts/evaluate.py: --max_length)")
            self.max_length = int(max_length)
        # Rows hold at most max_length tokens at positions 0..max_length-1. Refused here, before anything
        # compiles: past a learned table the position embedding would read NaN, silently.
        cfg.check_length(self.max_length, what="max_length", fix="max_length (scripts/evaluate.py: --max_length)")
        self.add_bos_token = check_add_bos_token(tokenizer, add_bos_token)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mesh is None and not jax.sharding.get_mesh().empty:
            mesh = jax.sharding.get_mesh()
        self.mesh = mesh
        self._shards = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        self.batch_size = _round_up(batch_size, self._shards)
        self._prefix_token_id = prefix_token_id
        self.share_prefix, self.min_shared_prefix = share_prefix, max(1, min_shared_prefix)
        self.stats = ScoringStats()

    @property
    def prefix_token_id(self) -> int:
        return resolve_prefix_token_id(self._require_tokenizer(), self._prefix_token_id)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this Scorer has no tokenizer: score token ids with loglikelihood_tokens")
        return self.tokenizer

    # -- text requests ----------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]], progress: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` of each ``(context, continuation)``."""
        tokenized = encode_requests(
            self._require_tokenizer(), list(requests), self.prefix_token_id, add_bos_token=self.add_bos_token
        )
        return self.loglikelihood_tokens(tokenized, progress=progress)

    def loglikelihood_rolling(self, texts: Sequence[str], progress: bool = False) -> list[float]:
        """The log-probability of each whole text, over the harness's rolling windows."""
        tokenizer, prefix = self._require_tokenizer(), self.prefix_token_id
        windows, owner = [], []
        for i, ids in enumerate(tok_encode(tokenizer, list(texts), prefix, add_bos_token=self.add_bos_token)):
            for window in rolling_windows(ids, prefix, self.max_length):
                windows.append(window)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (logprob, _) in zip(owner, self.loglikelihood_tokens(windows, progress=progress), strict=True):
            totals[i] += logprob
        return totals

    # -- token requests ---------------------------------------------------------------------------

    def loglikelihood_tokens(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], progress: bool = False
    ) -> list[tuple[float, bool]]:
        """Scores already tokenized ``(context_ids, continuation_ids)`` requests.

        Raises:
          ValueError: an empty context or continuation, a continuation longer
            than ``max_length``, or token ids outside the vocabulary.
        """
        start, truncated = time.perf_counter(), self.stats.truncated
        rows = self._rows(requests)
        if self.stats.truncated > truncated:
            logging.warning(
                "%d of %d requests exceed max_length + 1 = %d tokens: truncated from the left, as the harness does",
                self.stats.truncated - truncated,
                len(requests),
                self.max_length + 1,
            )
        self.stats.rows += len(rows)
        self.stats.input_tokens += sum(len(r.tokens) for r in rows)

        if self.share_prefix:
            groups, plain = _group_rows(rows, self.min_shared_prefix)
        else:
            groups, plain = [], list(range(len(rows)))
        # Longest first (as the harness): the slowest batches and any out-of-memory come first.
        plain.sort(key=lambda i: -len(rows[i].tokens))
        plain_widths = choose_widths([len(rows[i].tokens) for i in plain], _MAX_PLAIN_WIDTHS)
        size = self.batch_size
        work: list = [(None, [(i, 0, 0) for i in plain[j : j + size]]) for j in range(0, len(plain), size)]
        # Groups of similar prefix lengths form a wave; its suffixes are batched together, longest first.
        groups.sort(key=lambda g: -g[0])
        wave_size = min(_WAVE_GROUPS, _pow2(len(groups)))
        waves = [groups[j : j + wave_size] for j in range(0, len(groups), wave_size)]
        suffix_widths = choose_widths(
            [len(rows[i].tokens) - prefix for prefix, members in groups for i in members], _MAX_SUFFIX_WIDTHS
        )
        # One cache length for the call (it multiplies the suffix programs otherwise): the longest
        # prefix of a wave, then its widest suffix batch, in whole prefix chunks.
        cache_len = 0
        for wave in waves:
            entries = [(i, prefix, g) for g, (prefix, members) in enumerate(wave) for i in members]
            entries.sort(key=lambda e: e[1] - len(rows[e[0]].tokens))
            longest = max(len(rows[i].tokens) - prefix for i, prefix, _ in entries)
            wave_len = max(prefix for prefix, _ in wave)
            cache_len = max(cache_len, _round_up(wave_len + _width(suffix_widths, longest), _PREFIX_CHUNK))
            work.extend((wave, entries[j : j + self.batch_size]) for j in range(0, len(entries), self.batch_size))

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm.tqdm(total=len(requests), desc="log-likelihoods", disable=not progress, leave=False)
        graphdef, state = nnx.split(self.model)
        pending: collections.deque = collections.deque()
        caches: dict[int, tuple] = {}  # id(wave) -> (the wave's prefix cache, its longest prefix)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            for wave, entries in work:
                if wave is None:
                    batch = self._batch(rows, entries, plain_widths)
                    out = self._run_plain(graphdef, state, batch)
                else:
                    if id(wave) not in caches:  # The wave's first batch: compute its prefixes once.
                        caches.clear()
                        caches[id(wave)] = self._run_prefix(graphdef, state, rows, wave, wave_size, cache_len)
                    # Full batches (dummy rows are short suffixes): other batch sizes are other programs.
                    batch = self._batch(rows, entries, suffix_widths, full=True)
                    out = self._run_suffix(graphdef, state, batch, *caches[id(wave)])
                pending.append((batch, out))
                if len(pending) > _IN_FLIGHT:
                    bar.update(self._collect(rows, *pending.popleft(), results))
            while pending:
                bar.update(self._collect(rows, *pending.popleft(), results))
        bar.close()
        self.stats.seconds += time.perf_counter() - start
        return results  # type: ignore[return-value]

    def _rows(self, requests) -> list[_Row]:
        """Truncates requests as the harness does and merges those with equal model inputs."""
        vocab, limit = self.model.cfg.vocab_size, self.max_length
        rows: list[_Row] = []
        row_of: dict[bytes, int] = {}
        contexts: dict[int, np.ndarray] = {}  # A question's choices share one context list: convert it once.
        for i, (context, continuation) in enumerate(requests):
            if id(context) not in contexts:
                contexts[id(context)] = np.asarray(context, np.int64).reshape(-1)
            context_t, continuation = contexts[id(context)], [int(t) for t in continuation]
            if not context_t.size or not continuation:
                raise ValueError(f"request {i}: context and continuation must be non-empty token lists")
            if len(continuation) > limit:
                raise ValueError(f"request {i}: continuation of {len(continuation)} tokens > max_length {limit}")
            whole = np.concatenate([context_t[-(limit + 1) :], continuation])
            if whole.min() < 0 or whole.max() >= vocab:
                raise ValueError(f"request {i}: token ids must be in [0, {vocab})")
            if context_t.size + len(continuation) > limit + 1:
                self.stats.truncated += 1
            inputs = whole[-(limit + 1) :][:-1].astype(np.int32)
            r = row_of.setdefault(inputs.tobytes(), len(rows))
            if r == len(rows):
                rows.append(_Row(inputs))
            row = rows[r]
            row.window = max(row.window, len(continuation))
            row.requests.append((i, continuation))
            if continuation[-1] not in row.candidates:
                row.candidates.append(continuation[-1])
        self.stats.requests += len(requests)
        return rows

    def _batch(self, rows: list[_Row], entries: list[tuple[int, int, int]], widths, full: bool = False) -> _Batch:
        """Left-pads rows into one batch of a width from ``widths`` (dummy rows fill it).

        ``entries`` are ``(row id, prefix, group)``: the row's tokens after its
        first ``prefix`` (already in the cache of the wave's ``group``) go in.
        """
        row_ids = [i for i, _, _ in entries]
        lengths = [len(rows[i].tokens) - prefix for i, prefix, _ in entries]
        width = _width(widths, max(lengths))
        # A window's bucket may pass the row's width (a rolling window of 99 tokens: bucket 128, width 112).
        window = min(_window_bucket(max(rows[i].window for i in row_ids)), width)
        k = _candidates_bucket(max(len(rows[i].candidates) for i in row_ids))
        # A partial batch shrinks to a power of two (dummy rows cost as much as real ones), unless `full`.
        b = self.batch_size if full else min(self.batch_size, _round_up(_pow2(len(row_ids)), self._shards))
        tokens_bt = np.zeros((b, width), np.int32)
        positions_bt = np.zeros((b, width), np.int32)
        segment_ids_bt = np.zeros((b, width), np.int32)
        targets_bw = np.zeros((b, window), np.int32)
        cands_bk = np.zeros((b, k), np.int32)
        groups_b = np.zeros((b,), np.int32)
        for j, ((i, prefix, group), n) in enumerate(zip(entries, lengths, strict=True)):
            row = rows[i]
            tokens_bt[j, width - n :] = row.tokens[prefix:]
            positions_bt[j, width - n :] = np.arange(prefix, prefix + n)
            segment_ids_bt[j, width - n :] = 1
            groups_b[j] = group
            # The target of position t is token t + 1; the last position's targets are the candidates.
            shifted = np.concatenate([row.tokens[1:], row.candidates[:1]])
            w = min(window, len(row.tokens))
            targets_bw[j, window - w :] = shifted[len(row.tokens) - w :]
            cands_bk[j, : len(row.candidates)] = row.candidates
        self.stats.computed_tokens += sum(lengths)
        self.stats.padded_tokens += b * width
        return _Batch(row_ids, tokens_bt, positions_bt, segment_ids_bt, targets_bw, cands_bk, window, groups_b)

    def _put(self, *arrays: np.ndarray):
        if self.mesh is None:
            return arrays
        return tuple(jax.device_put(a, sharding.batch_sharding(self.mesh, a.ndim)) for a in arrays)

    def _run_plain(self, graphdef, state, batch: _Batch):
        b, t = batch.tokens_bt.shape
        self.stats.programs.add(("plain", b, t, batch.window, batch.cands_bk.shape[1]))
        arrays = self._put(batch.tokens_bt, batch.positions_bt, batch.segment_ids_bt, batch.targets_bw, batch.cands_bk)
        return _score_plain(graphdef, state, *arrays, window=batch.window)

    def _run_prefix(self, graphdef, state, rows: list[_Row], wave: list, wave_size: int, cache_len: int):
        """The KV cache of a wave's prefixes, one row per group, each computed in right-padded chunks (one program).

        Returns:
          ``(cache, index)``: ``index`` is the slot after the wave's longest prefix, where suffixes go.
        """
        abstract = jax.eval_shape(lambda: self.model.init_cache(wave_size, cache_len))
        cache = {k: np.zeros(v.shape, v.dtype) for k, v in abstract.items()}
        put = functools.partial(jax.device_put, device=None if self.mesh is None else sharding.replicated(self.mesh))
        cache = put(cache)  # A few rows: on a mesh every device holds them (replicated).
        longest = max(prefix for prefix, _ in wave)
        for g, (prefix, members) in enumerate(wave):
            tokens = rows[members[0]].tokens
            for start in range(0, prefix, _PREFIX_CHUNK):
                n = min(_PREFIX_CHUNK, prefix - start)
                tokens_1c = np.zeros((1, _PREFIX_CHUNK), np.int32)
                tokens_1c[0, :n] = tokens[start : start + n]
                positions_1c = np.where(np.arange(_PREFIX_CHUNK) < n, start + np.arange(_PREFIX_CHUNK), 0)[None]
                segment_ids_1c = (np.arange(_PREFIX_CHUNK) < n)[None].astype(np.int32)
                chunk = put((np.int32(g), np.int32(start), tokens_1c, positions_1c.astype(np.int32), segment_ids_1c))
                cache = _extend_prefix(graphdef, state, cache, *chunk)
            self.stats.padded_tokens += _round_up(prefix, _PREFIX_CHUNK)
        self.stats.programs.add(("prefix", wave_size, _PREFIX_CHUNK, cache_len))
        self.stats.prefix_groups += len(wave)
        prefix_tokens = sum(prefix for prefix, _ in wave)
        self.stats.shared_prefix_tokens += prefix_tokens
        self.stats.computed_tokens += prefix_tokens
        return cache, np.int32(longest)

    def _run_suffix(self, graphdef, state, batch: _Batch, cache, index):
        b, t = batch.tokens_bt.shape
        cache_len, wave_size = cache["segment_ids"].shape[1], cache["segment_ids"].shape[0]
        self.stats.programs.add(("suffix", b, t, cache_len, wave_size, batch.window, batch.cands_bk.shape[1]))
        arrays = self._put(
            batch.groups_b, batch.tokens_bt, batch.positions_bt, batch.segment_ids_bt, batch.targets_bw, batch.cands_bk
        )
        return _score_suffix(graphdef, state, cache, arrays[0], index, *arrays[1:], window=batch.window)

    def _collect(self, rows: list[_Row], batch: _Batch, out, results: list) -> int:
        """Reads one batch's outputs back and fills in the results of its rows' requests."""
        if not all(x.is_fully_addressable for x in out):  # multi-host: every process gets every row
            out = multihost_utils.process_allgather(out, tiled=True)
        target_bw, greedy_bw, cands_bk = (np.asarray(x) for x in jax.device_get(out))
        w, done = batch.window, 0
        for j, i in enumerate(batch.row_ids):
            row = rows[i]
            n = len(row.tokens)
            for request, continuation in row.requests:
                c = len(continuation)
                # Positions n-c .. n-2 predict continuation[:-1] (the row's own tokens), the last one its last token.
                span = slice(w - c, w - 1)
                last = cands_bk[j, row.candidates.index(continuation[-1])]
                logprob = float(np.sum(target_bw[j, span], dtype=np.float64) + last)
                greedy = bool(
                    np.array_equal(greedy_bw[j, span], row.tokens[n - c + 1 :])
                    and greedy_bw[j, w - 1] == continuation[-1]
                )
                results[request] = (logprob, greedy)
                done += 1
        return done
