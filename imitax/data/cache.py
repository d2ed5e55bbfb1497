"""Token cache: conversations tokenized once, stored as flat numpy arrays, memory-mapped to read.

A cache is the directory ``{cache_dir}/{key}/`` holding

=================  ===============  ======================================================
``ids.npy``        uint32 [T]       token ids of all examples, back to back
``mask.npy``       uint8 [T]        loss mask: 1 on teacher tokens and their end-of-turn token
``offsets.npy``    int64 [N + 1]    example ``i`` is ``[offsets[i], offsets[i + 1])``
``loss_counts.npy``  int64 [N]      each example's loss tokens (see ``num_loss_tokens``)
``meta.json``                       what the key was computed from, and the reading stats
=================  ===============  ======================================================

``key`` is a SHA-256 over: each source's absolute path, size and modification time (for a hub
dataset: its name and the size and time of the ``datasets`` cache files), the tokenizer
(:func:`~imitax.data.templates.tokenizer_hash`: its serialized JSON and special tokens), the record
format, the template, ``skip_invalid``, :data:`CACHE_VERSION` and a hash of the code that decides
the tokens (``formats.py``, ``templates.py``). Any change to one of these builds a new cache; a run
with the same inputs opens the existing one without tokenizing.

Writes are atomic: a cache is written into a temporary directory beside it and renamed into place
as a whole once complete, so no reader sees a partial cache. If two processes (say, the hosts of a
pod sharing a file system) build the same cache at once, the first rename wins and the other process
drops its copy and opens the winner's.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from imitax.data import formats, templates
from imitax.data.formats import DataError, Source, load_conversations, new_stats, resolve_sources
from imitax.data.templates import Encoder, tokenizer_hash

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = "~/.cache/imitax/tokens"
_ARRAYS = {"ids": np.uint32, "mask": np.uint8}


class TokenDataset:
    """Tokenized examples over flat arrays (memory-mapped from a cache, or in memory); or a selection.

    Selections (:meth:`select`) share the flat arrays and may shorten examples (a token budget
    truncates its last example).

    Attributes:
      ids: uint32 [T] token ids, shared by all selections of one cache.
      mask: uint8 [T] loss mask over ``ids``.
      starts: int64 [N] where each example starts in ``ids``.
      lengths: int64 [N] each example's length in tokens.
      loss_counts: int64 [N] each example's loss tokens.
      stats: the reading stats of the cache build (records, invalid, no_teacher, conversations, ...).
      path: the cache directory, or None.
    """

    def __init__(self, ids, mask, starts, lengths, loss_counts, stats=None, path=None):
        self.ids, self.mask = ids, mask
        self.starts = np.asarray(starts, np.int64)
        self.lengths = np.asarray(lengths, np.int64)
        self.loss_counts = np.asarray(loss_counts, np.int64)
        self.stats, self.path = dict(stats or {}), path

    @classmethod
    def from_examples(cls, examples: Iterable[tuple[Sequence[int], Sequence[int]]]) -> TokenDataset:
        """An in-memory dataset of ``(ids, mask)`` pairs (for tests and pre-tokenized data)."""
        examples = [(np.asarray(i, np.uint32), np.asarray(m, np.uint8)) for i, m in examples]
        lengths = np.array([len(i) for i, _ in examples], np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        ids = np.concatenate([i for i, _ in examples]) if examples else np.zeros(0, np.uint32)
        mask = np.concatenate([m for _, m in examples]) if examples else np.zeros(0, np.uint8)
        loss = [int(m[1:].sum()) for _, m in examples]
        return cls(ids, mask, starts, lengths, loss)

    @classmethod
    def open(cls, path: str) -> TokenDataset:
        """Opens the cache at ``path``, memory-mapping its arrays."""
        arrays = {n: np.load(os.path.join(path, f"{n}.npy"), mmap_mode="r") for n in (*_ARRAYS, "loss_counts")}
        offsets = np.load(os.path.join(path, "offsets.npy"))
        with open(os.path.join(path, "meta.json")) as f:
            stats = json.load(f)["stats"]
        ids, mask, loss = arrays["ids"], arrays["mask"], np.asarray(arrays["loss_counts"])
        return cls(ids, mask, offsets[:-1], np.diff(offsets), loss, stats, path)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)`` of example ``i`` (views into the flat arrays)."""
        start, length = self.starts[i], self.lengths[i]
        return self.ids[start : start + length], self.mask[start : start + length]

    @property
    def num_tokens(self) -> int:
        """Every token of every example: template text, system text, user and teacher turns,
        end-of-turn tokens and any BOS. Token budgets count these; padding is never counted."""
        return int(self.lengths.sum())

    @property
    def num_loss_tokens(self) -> int:
        """Tokens with loss: the teacher's tokens and end-of-turn tokens (mask 1), except an
        example's first token, which nothing predicts. This equals the loss-bearing targets of one
        epoch of ``packing='pack'`` batches."""
        return int(self.loss_counts.sum())

    def select(self, indices: Sequence[int], lengths: Sequence[int] | None = None) -> TokenDataset:
        """Examples ``indices``, in that order, optionally cut to ``lengths`` (each at most the full length)."""
        indices = np.asarray(indices, np.int64)
        full = self.lengths[indices]
        loss = self.loss_counts[indices].copy()
        if lengths is None:
            lengths = full
        else:
            lengths = np.asarray(lengths, np.int64)
            if np.any(lengths > full) or np.any(lengths < 1):
                raise ValueError("selected lengths must be between 1 and the examples' lengths")
            for k in np.flatnonzero(lengths < full):  # Few: a budget cuts one example.
                start = self.starts[indices[k]]
                loss[k] = int(self.mask[start + 1 : start + lengths[k]].sum())
        return TokenDataset(self.ids, self.mask, self.starts[indices], lengths, loss, self.stats, self.path)


def _code_hash() -> str:
    code = b"".join(pathlib.Path(m.__file__).read_bytes() for m in (formats, templates))
    return hashlib.sha256(code).hexdigest()


def cache_key(sources: list[Source], tokenizer, *, format: str, template: str, skip_invalid: bool):
    """``(key, description)``: the cache directory name and the inputs it was hashed from."""
    description = {
        "sources": [s.fingerprint() for s in sources],
        "tokenizer": tokenizer_hash(tokenizer),
        "format": format,
        "template": template,
        "skip_invalid": skip_invalid,
        "version": CACHE_VERSION,
        "code": _code_hash(),
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
    return key, description


def build_token_cache(
    sources: str | Iterable[str | Source],
    tokenizer,
    *,
    format: str = "auto",
    template: str = "koala",
    skip_invalid: bool = False,
    cache_dir: str = DEFAULT_CACHE_DIR,
    progress: bool = True,
    batch_size: int = 512,
) -> TokenDataset:
    """Tokenizes ``sources`` into a cache (or opens the cache made earlier from the same inputs).

    Args:
      sources: source specs or resolved sources (see :mod:`imitax.data.formats`).
      tokenizer: a ``transformers`` tokenizer.
      format, skip_invalid: as in :func:`~imitax.data.formats.load_conversations`.
      template: a turn format of :mod:`imitax.data.templates`.
      cache_dir: where caches live.
      progress: show a progress bar while tokenizing.
      batch_size: conversations per batched tokenizer call.

    Returns:
      The cache's examples, in source order. ``stats`` counts ``records`` read, ``invalid`` ones
      skipped (with ``chat_template``, also conversations its template rejects), conversations
      dropped for ``no_teacher``, the ``conversations`` kept, and their ``tokens`` and ``loss_tokens``.

    Raises:
      DataError: a bad record (unless ``skip_invalid``).
      ValueError: no usable example.
    """
    if isinstance(sources, str):
        sources = [sources]
    resolved = [s for spec in sources for s in ([spec] if isinstance(spec, Source) else resolve_sources(spec))]
    key, description = cache_key(resolved, tokenizer, format=format, template=template, skip_invalid=skip_invalid)
    cache_dir = os.path.expanduser(cache_dir)
    path = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(path, "meta.json")):
        return TokenDataset.open(path)

    encoder = Encoder(tokenizer, template)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir)
    try:
        stats = _tokenize(resolved, encoder, format, skip_invalid, tmp, progress, batch_size)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"inputs": description, "stats": stats}, f, indent=1)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.exists(os.path.join(path, "meta.json")):
                raise
            shutil.rmtree(tmp)  # Another process finished the same cache first.
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenDataset.open(path)


def _tokenize(sources, encoder: Encoder, format, skip_invalid, out_dir, progress, batch_size) -> dict:
    """Writes ids/mask/offsets/loss_counts ``.npy`` files into ``out_dir``; returns the stats."""
    stats = new_stats() | {"tokens": 0, "loss_tokens": 0}
    lengths, loss_counts, batch = [], [], []
    # Raw files grow batch by batch so memory stays flat; they become .npy files at the end.
    files = {name: open(os.path.join(out_dir, f"{name}.bin"), "wb") for name in _ARRAYS}
    bar = tqdm(desc="tokenizing", unit=" conv", disable=not progress)

    def flush():
        pieces = []
        for conv in batch:
            try:
                pieces.append(encoder.pieces(conv))
            except DataError:
                if not skip_invalid:
                    raise
                stats["invalid"] += 1
                stats["conversations"] -= 1
        for ids, mask in encoder.encode_pieces(pieces):
            ids.tofile(files["ids"])
            mask.tofile(files["mask"])
            lengths.append(len(ids))
            loss_counts.append(int(mask[1:].sum()))
        bar.update(len(batch))
        bar.set_postfix(tokens=sum(lengths), refresh=False)
        batch.clear()

    try:
        for conv in load_conversations(sources, format, skip_invalid=skip_invalid, stats=stats):
            batch.append(conv)
            if len(batch) >= batch_size:
                flush()
        flush()
    finally:
        bar.close()
        for f in files.values():
            f.close()
    if not lengths:
        raise ValueError(f"no usable examples in {[s.name for s in sources]} (stats: {stats})")
    for name, dtype in _ARRAYS.items():
        raw = os.path.join(out_dir, f"{name}.bin")
        np.save(os.path.join(out_dir, f"{name}.npy"), np.memmap(raw, dtype=dtype, mode="r"))
        os.remove(raw)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(os.path.join(out_dir, "offsets.npy"), offsets)
    np.save(os.path.join(out_dir, "loss_counts.npy"), np.asarray(loss_counts, np.int64))
    stats.update(tokens=int(offsets[-1]), loss_tokens=int(sum(loss_counts)), sources=[s.name for s in sources])
    return stats
