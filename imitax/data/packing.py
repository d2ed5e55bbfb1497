"""Packed batches: rows of ``seq_len`` tokens, in an order that is a pure function of (seed, step).

``packing='pack'`` (default): every example goes whole into one row beside others (best fit: the
open row with the least room that holds it). ``segment_ids`` number a row's examples 1, 2, ...
(0 = padding) and ``positions`` restart at 0 for each, so that a segment-aware attention mask keeps
every token inside its own example. An example longer than ``seq_len`` is split into chunks of
``seq_len`` tokens (the last one shorter), each packed as its own segment with positions from 0:
later chunks do not see the earlier ones. Targets are the next token *of the same example*: the last
token of an example has target 0 with loss 0, so no target crosses from one example into the next;
the last token of a chunk of a split example targets the first token of the next chunk (the same
example's next token), so splitting loses no target. One epoch of batches thus trains exactly
``dataset.num_loss_tokens`` loss-bearing targets.

``packing='concat'`` (the study's EasyLM pipeline): the examples are concatenated, in order, into one
stream, cut into rows of ``seq_len`` tokens. (EasyLM also fed a BOS token as each row's first input;
here each example starts with the tokenizer's own BOS, if it has one, instead.) One segment per
row (id 1; padding 0 at the end of the last row), positions 0..seq_len-1, and targets are the
stream's next token even across examples, with the loss mask carried along (the mask of the target
token).

Rows are built once, in the dataset's order. Epoch ``e`` visits every row once, in a permutation
seeded by ``(seed, e)``; step ``s`` of the run takes rows ``[i * B, (i + 1) * B)`` of epoch ``s //
steps_per_epoch`` (``i = s % steps_per_epoch``, ``B = batch_size``). The epoch's last batch is filled
up with empty rows (all zeros, no loss), so no row is skipped. ``batch_at(step)`` therefore depends
on nothing but (seed, step): an iterator's whole state is the step.

Batches are dicts of numpy arrays of shape [rows, seq_len]: ``inputs``, ``targets``,
``segment_ids``, ``positions`` (int32) and ``loss_mask`` (float32, the mask of each target).
"""

from __future__ import annotations

import bisect

import numpy as np

from imitax.data.cache import TokenDataset

PACKINGS = ("pack", "concat")
EPOCH_STREAM = 1  # np.random.default_rng([seed, EPOCH_STREAM, epoch]); budget.py uses stream 0.


def best_fit(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Packs examples of ``lengths`` (split into chunks of at most ``seq_len``) into rows.

    Returns:
      ``(example, offset, length, row_ptr)``: the pieces, grouped by row (in row order, and in the
      order they were placed within a row); row ``r`` holds pieces ``row_ptr[r]:row_ptr[r + 1]``, and
      a piece is tokens ``[offset, offset + length)`` of ``example``.
    """
    example, offset, length, row = [], [], [], []
    open_rows: list[tuple[int, int]] = []  # (room left, row), sorted: bisect finds the best fit.
    num_rows = 0
    for i, n in enumerate(lengths.tolist()):
        for start in range(0, n, seq_len):
            size = min(seq_len, n - start)
            k = bisect.bisect_left(open_rows, (size, -1))
            if k < len(open_rows):
                room, r = open_rows.pop(k)
            else:
                room, r, num_rows = seq_len, num_rows, num_rows + 1
            example.append(i)
            offset.append(start)
            length.append(size)
            row.append(r)
            if room > size:
                bisect.insort(open_rows, (room - size, r))
    row = np.asarray(row, np.int64)
    order = np.argsort(row, kind="stable")
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=num_rows))]).astype(np.int64)
    as_array = lambda x: np.asarray(x, np.int64)[order]
    return as_array(example), as_array(offset), as_array(length), row_ptr


class PackedBatches:
    """Global batches of packed rows; see the module docstring.

    Args:
      dataset: the examples, in the order rows are built (``split_examples``' shuffled order).
      seq_len: tokens per row.
      batch_size: rows per global batch (all processes together).
      seed: seeds each epoch's row order.
      packing: ``'pack'`` or ``'concat'``.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, batch_size: int, seed: int = 0, packing: str = "pack"):
        if packing not in PACKINGS:
            raise ValueError(f"unknown packing {packing!r} (expected one of {PACKINGS})")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if dataset.num_tokens == 0:
            raise ValueError("cannot make batches of an empty dataset")
        self.dataset, self.seq_len, self.batch_size = dataset, seq_len, batch_size
        self.seed, self.packing = seed, packing
        if packing == "pack":
            self._pieces = best_fit(dataset.lengths, seq_len)
            self.num_rows = len(self._pieces[3]) - 1
        else:
            self._stream = np.concatenate([[0], np.cumsum(dataset.lengths)])  # Example i starts at _stream[i].
            self.num_rows = -(-dataset.num_tokens // seq_len)
        self.steps_per_epoch = -(-self.num_rows // batch_size)
        self._epoch_order: tuple[int, np.ndarray] | None = None

    @property
    def stats(self) -> dict:
        tokens = self.dataset.num_tokens
        return {
            "rows": self.num_rows,
            "steps_per_epoch": self.steps_per_epoch,
            "tokens": tokens,
            "loss_tokens": self.dataset.num_loss_tokens,
            "padding_fraction": 1 - tokens / (self.steps_per_epoch * self.batch_size * self.seq_len),
        }

    def rows_at(self, step: int) -> np.ndarray:
        """The global batch's row ids at ``step`` (-1 for the empty rows that fill an epoch's end)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = np.random.default_rng([self.seed, EPOCH_STREAM, epoch])
            self._epoch_order = (epoch, rng.permutation(self.num_rows))
        rows = self._epoch_order[1][i * self.batch_size : (i + 1) * self.batch_size]
        return np.concatenate([rows, np.full(self.batch_size - len(rows), -1, np.int64)])

    def batch_at(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's rows of the global batch at ``step``.

        With ``process_count`` P, process p gets rows ``[p * B / P, (p + 1) * B / P)`` of the global
        batch -- the same arrays as slicing the single-process batch -- and builds only those.
        """
        if self.batch_size % process_count or not 0 <= process_index < process_count:
            raise ValueError(f"bad process {process_index} of {process_count} for batch size {self.batch_size}")
        local = self.batch_size // process_count
        return self.rows_batch(self.rows_at(step)[process_index * local : (process_index + 1) * local])

    def rows_batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of rows ``rows`` (-1: an empty row), in that order."""
        names = ("inputs", "targets", "segment_ids", "positions")
        batch = {k: np.zeros((len(rows), self.seq_len), np.int32) for k in names}
        batch["loss_mask"] = np.zeros((len(rows), self.seq_len), np.float32)
        fill = self._fill_packed if self.packing == "pack" else self._fill_concat
        for j, r in enumerate(rows):
            if r >= 0:
                fill(int(r), {k: v[j] for k, v in batch.items()})
        return batch

    def _fill_packed(self, r: int, out: dict[str, np.ndarray]) -> None:
        example, offset, length, row_ptr = self._pieces
        ds, pos = self.dataset, 0
        for segment, p in enumerate(range(row_ptr[r], row_ptr[r + 1]), start=1):
            e, n = example[p], int(length[p])
            start = int(ds.starts[e] + offset[p])
            t = min(n, int(ds.lengths[e] - offset[p]) - 1)  # Targets inside the example: n, or n - 1 at its end.
            out["inputs"][pos : pos + n] = ds.ids[start : start + n]
            out["targets"][pos : pos + t] = ds.ids[start + 1 : start + 1 + t]
            out["loss_mask"][pos : pos + t] = ds.mask[start + 1 : start + 1 + t]
            out["segment_ids"][pos : pos + n] = segment
            out["positions"][pos : pos + n] = np.arange(n)
            pos += n

    def _fill_concat(self, r: int, out: dict[str, np.ndarray]) -> None:
        ds, stream = self.dataset, self._stream
        begin, end = r * self.seq_len, min((r + 1) * self.seq_len + 1, int(stream[-1]))  # +1: the last target.
        ids, mask = [], []
        i = int(np.searchsorted(stream, begin, side="right")) - 1
        while i < len(ds) and stream[i] < end:
            a, b = max(begin, stream[i]) - stream[i], min(end, stream[i + 1]) - stream[i]
            ids.append(ds.ids[ds.starts[i] + a : ds.starts[i] + b])
            mask.append(ds.mask[ds.starts[i] + a : ds.starts[i] + b])
            i += 1
        ids, mask = np.concatenate(ids), np.concatenate(mask)
        n = min(self.seq_len, len(ids))
        out["inputs"][:n] = ids[:n]
        out["targets"][: len(ids) - 1] = ids[1 : n + 1]
        out["loss_mask"][: len(ids) - 1] = mask[1 : n + 1]
        out["segment_ids"][:n] = 1
        out["positions"][:n] = np.arange(n)
