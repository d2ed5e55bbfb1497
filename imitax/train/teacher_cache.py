"""A teacher's top-k next-token distributions, computed once and read with the training batches.

``scripts/teacher_logits.py`` builds a run's packed rows exactly as the trainer does (the same
config: data, selection, ``seq_len``, packing) and runs the teacher over every row once. For each
scored position (loss mask > 0), row by row and left to right, it keeps the teacher's ``k`` most
likely tokens and their log-probabilities at ``kd.temperature``, plus the log of the mass left
outside them (:func:`imitax.train.distill.topk_log_probs`). A cache directory holds::

    ids.npy        [scored positions, k] int32
    logp.npy       [scored positions, k + 1] float32 (the last column: the rest)
    row_ptr.npy    [rows + 1] int64: row r's positions are ids[row_ptr[r]:row_ptr[r + 1]]
    cache.json     the fingerprint, and what it was made of (data, teacher, k, temperature)

The trainer reads the entries of each batch's rows (the rows' order is the run's, a function of
seed and step) into ``[batch, length, k]`` arrays. The fingerprint covers the rows (the token
cache, the selection, ``seq_len``, packing) and the teacher (its files), so a cache made from other
data, with another teacher or at another temperature is refused.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import numpy as np
from etils import epath

from imitax import convert, records
from imitax.data import PackedBatches

FILES = ("ids.npy", "logp.npy", "row_ptr.npy")
# Batch keys the cache adds (the train step's TEACHER_KEYS).
KEYS = ("teacher_ids", "teacher_logp")


class CacheError(ValueError):
    """A cache that does not belong to the run (other data, teacher or temperature)."""


def model_fingerprint(path: epath.PathLike) -> str:
    """A content hash of a model directory's files: each one's relative path, size and first MiB.

    Reads a few MB whatever the model's size, and does not change when the directory is copied.
    """
    root = pathlib.Path(convert.resolve(path))
    digest = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(root)}:{f.stat().st_size}".encode())
        with f.open("rb") as fh:
            digest.update(fh.read(2**20))
    return digest.hexdigest()[:16]


def fingerprint(batches: PackedBatches, token_cache: str, teacher: str, top_k: int, temperature: float):
    """``(fingerprint, what it covers)`` of the cache a run with these rows and this teacher reads.

    ``token_cache``: the token cache's directory (its name is the hash of the sources and tokenizer).
    """
    ds = batches.dataset
    made_of = {
        "data": epath.Path(token_cache).name,
        "examples": hashlib.sha256(ds.starts.tobytes() + ds.lengths.tobytes()).hexdigest()[:16],
        "rows": batches.num_rows,
        "seq_len": batches.seq_len,
        "packing": batches.packing,
        "tokens": batches.dataset.num_tokens,
        "loss_tokens": batches.dataset.num_loss_tokens,
        "teacher": model_fingerprint(teacher),
        "top_k": top_k,
        "temperature": temperature,
    }
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16], made_of


def write(out: epath.PathLike, score_rows, batches: PackedBatches, top_k: int, info: dict, overwrite: bool = False):
    """Writes the cache of every row of ``batches`` (in batches of its ``batch_size`` rows) to ``out``.

    Args:
      score_rows: ``batch -> (ids [b, t, k], logp [b, t, k + 1])`` (the jitted teacher).
      info: ``cache.json``'s contents (the fingerprint and what it covers).
    """
    ids, logp, counts = [], [], np.zeros(batches.num_rows, np.int64)
    for start in range(0, batches.num_rows, batches.batch_size):
        rows = np.arange(start, min(start + batches.batch_size, batches.num_rows))
        batch = batches.rows_batch(np.concatenate([rows, np.full(batches.batch_size - len(rows), -1)]))
        top_ids, top_logp = (np.asarray(x) for x in jax.device_get(score_rows(batch)))
        for j, r in enumerate(rows):
            scored = batch["loss_mask"][j] > 0
            ids.append(top_ids[j][scored])
            logp.append(top_logp[j][scored])
            counts[r] = int(scored.sum())
    row_ptr = np.concatenate([[0], np.cumsum(counts)])
    with convert.checkpoint.staged_directory(out, overwrite) as staged:
        staged.mkdir(parents=True)
        np.save(staged / "ids.npy", np.concatenate(ids).reshape(-1, top_k).astype(np.int32))
        np.save(staged / "logp.npy", np.concatenate(logp).reshape(-1, top_k + 1).astype(np.float32))
        np.save(staged / "row_ptr.npy", row_ptr)
        records.write_json(staged / "cache.json", info)
    return epath.Path(out)


class TeacherCache:
    """An opened cache (memory-mapped); :meth:`batch_for` gives a batch's teacher arrays.

    Args:
      directory: what ``scripts/teacher_logits.py`` wrote.
      batches, token_cache, teacher, temperature: the run's, for :func:`fingerprint`.

    Raises:
      CacheError: not a cache, or one made for other rows, another teacher or temperature.
    """

    def __init__(self, directory: epath.PathLike, batches, token_cache: str, teacher: str, temperature: float):
        directory = epath.Path(directory)
        if not (directory / "cache.json").is_file():
            raise CacheError(
                f"config.kd.cache: {directory} is not a teacher cache (no cache.json); "
                "write one with scripts/teacher_logits.py"
            )
        self.info = json.loads((directory / "cache.json").read_text())
        top_k = self.info["made_of"]["top_k"]
        expected, _ = fingerprint(batches, token_cache, teacher, top_k, temperature)
        if self.info["fingerprint"] != expected:
            raise CacheError(
                f"config.kd.cache: {directory} was made for other data, another teacher or another temperature "
                f"(fingerprint {self.info['fingerprint']}, this run's {expected}); "
                "rerun scripts/teacher_logits.py with this run's flags"
            )
        self.ids, self.logp, self.row_ptr = (np.load(directory / f, mmap_mode="r") for f in FILES)
        self.top_k = self.ids.shape[1]

    def batch_for(self, rows: np.ndarray, loss_mask: np.ndarray) -> dict[str, np.ndarray]:
        """``teacher_ids [b, t, k]`` and ``teacher_logp [b, t, k + 1]`` for ``rows`` (-1: an empty row).

        Positions without loss get all the teacher's mass on token 0, a finite placeholder the
        loss mask then zeroes.
        """
        b, t = loss_mask.shape
        ids = np.zeros((b, t, self.top_k), np.int32)
        logp = np.full((b, t, self.top_k + 1), -np.inf, np.float32)
        logp[..., 0] = 0.0
        for j, r in enumerate(rows):
            if r < 0:
                continue
            scored = np.flatnonzero(loss_mask[j] > 0)
            lo, hi = int(self.row_ptr[r]), int(self.row_ptr[r + 1])
            if hi - lo != len(scored):
                raise CacheError(f"the teacher cache's row {r} has {hi - lo} scored positions, the batch {len(scored)}")
            ids[j, scored] = self.ids[lo:hi]
            logp[j, scored] = self.logp[lo:hi]
        return {"teacher_ids": ids, "teacher_logp": logp}


def build(config, out: epath.PathLike, top_k: int, *, overwrite: bool = False) -> epath.Path:
    """Scores every row of ``config``'s run with ``config.teacher``; writes the cache to ``out``.

    The rows are the trainer's (its data, selection, ``seq_len`` and packing); tokens are cached
    in ``token_cache/`` beside ``out``. Single-process.

    Raises:
      TrainingError, ConfigError: as the trainer would for the same config; FileExistsError: ``out``.
    """
    import transformers
    from flax import nnx

    from imitax import sharding
    from imitax.data import build_datasets
    from imitax.train import config as train_config
    from imitax.train import distill, loop

    out = epath.Path(out)
    convert.checkpoint.check_output(out, overwrite)
    student = train_config.check(config)
    kd = train_config.kd_config(config) or distill.KDConfig()
    if not 1 <= top_k <= student.vocab_size:
        raise ValueError(f"--top_k must be in [1, {student.vocab_size}] (the vocabulary), got {top_k}")
    mesh = sharding.make_mesh(config.mesh)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(loop.tokenizer_dir(config)))
    splits = build_datasets(loop.data_config(config, out.parent), tokenizer, progress=False)
    batches = PackedBatches(splits.train, config.seq_len, config.batch_size, config.seed, config.data.packing)
    fp, made_of = fingerprint(batches, splits.stats.get("cache", ""), config.teacher, top_k, kd.temperature)
    with jax.set_mesh(mesh):
        graphdef, params = nnx.split(loop.load_teacher(config, student, tokenizer, mesh))

        @jax.jit
        def score(params, batch):
            logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
            return distill.topk_log_probs(logits, top_k, kd.temperature)

        batch_sharding = sharding.batch_sharding(mesh)

        def score_rows(batch):
            return score(params, {k: jax.device_put(v, batch_sharding) for k, v in batch.items()})

        return write(out, score_rows, batches, top_k, {"fingerprint": fp, "made_of": made_of}, overwrite)
