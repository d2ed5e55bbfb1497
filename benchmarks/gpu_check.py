r"""The GPU check's driver: the model tests and the benchmarks on one GPU, summed up in one table.

  bash benchmarks/gpu_check.sh                                       # what to run: installs, then runs this
  python benchmarks/gpu_check.py                                     # in an environment that has the gpu extra
  python benchmarks/gpu_check.py --smoke                             # on the CPU, tiny shapes: a dry run

Each section runs in a process of its own, with a time limit (``--budgets``), and its whole
output goes to ``--logs``; a section that fails or runs out of time is a row that says so,
and the others still run. The sections:

* ``tests``: ``pytest`` on ``--tests`` (the models against transformers' PyTorch models), JAX on
  the GPU: ``JAX_PLATFORMS=cuda,cpu`` (tests/conftest.py only picks ``cpu`` when it is unset)
  and ``JAX_DEFAULT_MATMUL_PRECISION=highest``, since the tests' float32 tolerance is not meant
  for TensorFloat-32 matmuls.
* ``train``: ``train_benchmark.py --model=llama1b_full --dtype=bfloat16 --batch=8 --seq=1024`` (16
  layers at LLaMA-1B widths, float32 weights and AdamW state, bfloat16 compute on both sides;
  8,192 tokens a step, enough to keep an H100 busy). MFU against the GPU's
  published dense bfloat16 peak (:data:`PUBLISHED_BF16_TFLOPS`, by name) and against the
  bfloat16 matmul probe timed in the same rounds (the script's own MFU column).
* ``forward``: ``forward_benchmark.py --tasks=forward --dtype=bfloat16``, GPT-2-124M and the
  16-layer LLaMA-1B shape: tokens/s against transformers' forward pass on the same GPU.
* ``generate``: ``generate_benchmark.py --sections=torch --dtype=bfloat16``, each model: greedy
  decoding tokens/s against transformers' ``generate`` on the same GPU, batch 1 and 8.
* ``mmlu``: ``mmlu_benchmark.py --skip_harness`` on synthetic questions (or ``--mmlu_jsonl``'s),
  GPT-2-124M in bfloat16: the scoring time of a first run (compiling) and of a second one.

Targets: MFU >= 50% (issue 10, for H100/H200-class GPUs); against transformers, which issue 10
sets no GPU target for, parity (>= 1.0x) is the bar printed.

JAX does not preallocate GPU memory here (``XLA_PYTHON_CLIENT_PREALLOCATE=false``): PyTorch
shares the GPU in the same processes. Without a GPU (and without ``--smoke``) the script says so
in one line and exits 1. ``--smoke`` runs every section on whatever device there is, with each
script's ``--smoke`` shapes and a one-test selection.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

# Run as a script from anywhere: make the repo root importable for `benchmarks`.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Read when JAX starts its GPU client: this process's own must not take 75% of the GPU's memory.
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

from benchmarks import common  # noqa: E402

_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes on any device (CPU included): a dry run of every section.")
_SECTIONS = flags.DEFINE_list("sections", ["tests", "train", "forward", "generate", "mmlu"], "Sections to run.")
_TESTS = flags.DEFINE_list("tests", ["tests/test_models.py", "tests/test_attention.py"], "Test files run on the GPU.")
_MMLU_JSONL = flags.DEFINE_string("mmlu_jsonl", None, "Real MMLU questions (see benchmarks/mmlu_benchmark.py).")
_BUDGETS = flags.DEFINE_list(
    "budgets",
    ["tests=120", "train=130", "forward=50", "generate=45", "mmlu=40"],
    "Seconds each section may run (section=seconds; generate: per model); 7.2 minutes in all, plus the install.",
)
_LOGS = flags.DEFINE_string("logs", None, "Where each section's whole output goes (default: a new temp dir).")
_OUT = flags.DEFINE_string("out", None, "Also write the report (Markdown) to this file.")

SECTIONS = ("tests", "train", "forward", "generate", "mmlu")

# Dense (no sparsity) bfloat16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, by a part of
# the name nvidia-smi reports; the first match wins (more specific names first).
PUBLISHED_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)
TARGET_MFU = 0.50  # the 1B train step in bfloat16 on an H100/H200-class GPU
# No GPU throughput targets were set against transformers: parity is the bar printed.
TARGET_VS_TORCH = 1.0


def published_peak(name: str) -> float | None:
    """FLOP/s of ``name``'s published dense bfloat16 peak, or None for a GPU not in the table."""
    return next((tflops * 1e12 for part, tflops in PUBLISHED_BF16_TFLOPS if part in name), None)


# -- running and reading the sections ------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One section's process: its output, exit status, seconds and log file."""

    name: str
    output: str
    returncode: int
    seconds: float
    log: str

    @property
    def failure(self) -> str | None:
        if self.returncode == 0:
            return None
        what = "timed out" if self.returncode == -9 else f"failed (exit {self.returncode})"
        return f"{what} after {self.seconds:.0f} s, see {self.log}"


def run_section(name: str, argv: list[str], env: dict[str, str], budget: float, log_dir: str) -> Run:
    """Runs ``argv`` from the repository root, its output teed to ``log_dir/name.log``, killed after ``budget`` s."""
    log = os.path.join(log_dir, f"{name}.log")
    print(f"== {name}: {shlex.join(argv)} (at most {budget:.0f} s; log {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=budget)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = -9
    with open(log) as f:
        output = f.read()
    return Run(name, output, returncode, time.perf_counter() - start, log)


def tables(text: str) -> list[list[dict[str, str]]]:
    """The Markdown tables in ``text`` (as ``common.format_table`` prints them): rows as header -> cell."""
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2:
            header, rows = block[0], block[2:]
            found.append([dict(zip(header, row, strict=False)) for row in rows])
        block = []
    return found


def find_rows(text: str, column: str, **match: str) -> list[dict[str, str]]:
    """Rows of the last table in ``text`` that has ``column``, whose cells are as ``match`` says."""
    for table in reversed(tables(text)):
        if table and column in table[0]:
            return [r for r in table if all(r.get(k) == v for k, v in match.items())]
    return []


def number(cell: str) -> float:
    """The number a cell starts with: '1.23x' -> 1.23, '45%' -> 0.45, '1200' -> 1200."""
    value = float(re.match(r"[-+0-9.e]+", cell).group())
    return value / 100 if cell.endswith("%") else value


# -- the sections' rows: (what, target, measured, met) -------------------------------------------------


def rate(flops_per_s: float) -> str:
    """``'512 TFLOP/s'``, or GFLOP/s below one TFLOP/s (a dry run on the CPU)."""
    return f"{flops_per_s / 1e12:.0f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.0f} GFLOP/s"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def tests_rows(run: Run) -> list[list[str]]:
    # pytest's last line: "12 passed, 1 skipped in 34.56s" (with -q; framed by '=' without it).
    summary = next((ln for ln in reversed(run.output.splitlines()) if re.search(r"\d+ \w+.* in [\d.]+s", ln)), "")
    measured = summary.strip("= ") or run.failure or "no summary"
    where, ok = ("CPU" if _SMOKE.value else "GPU"), verdict(run.returncode == 0)
    return [[f"model tests vs transformers, JAX on {where} ({', '.join(_TESTS.value)})", "all pass", measured, ok]]


def train_rows(run: Run, gpu_name: str) -> list[list[str]]:
    rows = find_rows(run.output, "MFU", impl="imitax[ynn]")
    if not rows:
        return [["LLaMA-1B train step MFU, bfloat16", f">= {TARGET_MFU:.0%}", run.failure or "no table", "NO"]]
    imitax = rows[0]
    torch_rows = find_rows(run.output, "MFU", impl="torch")
    achieved = number(imitax["GFLOP/s"]) * 1e9
    peak = published_peak(gpu_name)
    shape = f"{imitax['model']}, {imitax['batch x seq']}"
    out = []
    if peak is None:
        out.append(
            [f"train step MFU vs published peak ({shape})", f">= {TARGET_MFU:.0%}", f"{gpu_name}: no peak known", "-"]
        )
    else:
        mfu = achieved / peak
        measured = f"{mfu:.1%} ({rate(achieved)} of {rate(peak)})"
        out.append(
            [
                f"train step MFU vs published bf16 peak ({shape})",
                f">= {TARGET_MFU:.0%}",
                measured,
                verdict(mfu >= TARGET_MFU),
            ]
        )
    probe = number(imitax["roofline GFLOP/s"]) * 1e9
    mfu = number(imitax["MFU"])
    measured = f"{mfu:.1%} ({rate(achieved)}; matmul probe {rate(probe)})"
    out.append(
        [
            f"train step MFU vs measured bf16 matmul ({shape})",
            f">= {TARGET_MFU:.0%}",
            measured,
            verdict(mfu >= TARGET_MFU),
        ]
    )
    if torch_rows:
        speed = number(imitax["vs torch (raw / MFU)"])
        measured = f"{speed:.2f}x ({imitax['tokens/s']} vs {torch_rows[0]['tokens/s']} tokens/s)"
        out.append(
            [
                f"train step vs PyTorch AdamW ({shape})",
                f">= {TARGET_VS_TORCH}x",
                measured,
                verdict(speed >= TARGET_VS_TORCH),
            ]
        )
    return out


def forward_rows(run: Run) -> list[list[str]]:
    rows = find_rows(run.output, "tokens/s", impl="imitax[ynn]")
    if not rows:
        return [
            ["forward tokens/s vs transformers, bfloat16", f">= {TARGET_VS_TORCH}x", run.failure or "no table", "NO"]
        ]
    out = []
    for row in rows:
        torch_row = find_rows(run.output, "tokens/s", model=row["model"], impl="torch")[0]
        speed = number(row["vs torch"])
        measured = f"{speed:.2f}x ({row['tokens/s']} vs {torch_row['tokens/s']} tokens/s)"
        what = f"forward tokens/s vs transformers ({row['model']}, {row['batch x seq']})"
        out.append([what, f">= {TARGET_VS_TORCH}x", measured, verdict(speed >= TARGET_VS_TORCH)])
    return out


def generate_rows(run: Run) -> list[list[str]]:
    rows = find_rows(run.output, "tokens/s", impl="imitax")
    if not rows:
        what = f"greedy decoding tokens/s vs transformers ({run.name})"
        return [[what, f">= {TARGET_VS_TORCH}x", run.failure or "no table", "NO"]]
    out = []
    for row in rows:
        torch_row = find_rows(run.output, "tokens/s", model=row["model"], impl="torch", batch=row["batch"])[0]
        speed = number(row["vs torch"])
        measured = f"{speed:.2f}x ({row['tokens/s']} vs {torch_row['tokens/s']} tokens/s)"
        what = (
            f"greedy decoding tokens/s vs transformers ({row['model']}, batch {row['batch']}, {row['new tokens']} new)"
        )
        out.append([what, f">= {TARGET_VS_TORCH}x", measured, verdict(speed >= TARGET_VS_TORCH)])
    return out


def mmlu_rows(run: Run) -> list[list[str]]:
    first = find_rows(run.output, "wall s", run="imitax (1st run: compiles)")
    second = find_rows(run.output, "wall s", run="imitax (2nd run, same LM)")
    source = next((line.split(":")[0] for line in run.output.splitlines() if "questions of" in line), "MMLU")
    if not first or not second:
        return [[f"MMLU scoring time ({source})", "-", run.failure or "no table", "-"]]
    questions = next((line for line in run.output.splitlines() if line.startswith("gpt2, ")), "gpt2").split(";")[0]
    measured = f"{first[0]['wall s']} s first run ({first[0]['compile s']} s compiling), {second[0]['wall s']} s again"
    return [[f"MMLU scoring time, {questions} ({source})", "-", measured, "-"]]


ROWS = {
    "tests": lambda run, gpu_name: tests_rows(run),
    "train": train_rows,
    "forward": lambda run, gpu_name: forward_rows(run),
    "generate": lambda run, gpu_name: generate_rows(run),
    "mmlu": lambda run, gpu_name: mmlu_rows(run),
}


# -- the machine ------------------------------------------------------------------------------------


def facts() -> tuple[str, list[str]]:
    """The GPU's name (or the CPU's, in a dry run) and lines of versions, driver and devices."""
    import jax
    import torch

    lines = [f"python {platform.python_version()}, jax {jax.__version__}, torch {torch.__version__}"]
    lines.append(f"JAX devices: {', '.join(f'{d.platform}:{d.device_kind}' for d in jax.devices())}")
    if torch.cuda.is_available():
        lines.append(f"torch CUDA {torch.version.cuda}, device {torch.cuda.get_device_name()}")
    name = jax.devices()[0].device_kind
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True).stdout.strip()
        lines.append(f"nvidia-smi: {smi}")
        name = smi.split(",")[0].strip() or name
    lines.append(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    return name, lines


def has_gpu() -> bool:
    # JAX logs each platform it fails to start (TPU, here) at INFO: not news when looking for a GPU.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend: "Unknown backend" or a plugin that found no device
        return False


# -- main -------------------------------------------------------------------------------------------


def commands(smoke: bool) -> dict[str, list[tuple[str, list[str]]]]:
    """Each section's runs: (name, argv)."""
    py = sys.executable
    bench = lambda script, *args: [py, f"benchmarks/{script}_benchmark.py", *args, *(["--smoke"] if smoke else [])]
    bf16 = "--dtype=bfloat16"
    peak = [] if smoke else ["--peak_sizes=8192"]
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_TESTS.value]
    if smoke:
        tests += ["-k", "test_right_padded_batch_matches_each_sequence_alone and gpt2"]
    train = ["--model=llama1b_full", bf16, "--iters=3", *peak] + ([] if smoke else ["--batch=8", "--seq=1024"])
    mmlu_data = (
        [f"--mmlu_jsonl={_MMLU_JSONL.value}", "--subjects=8"] if _MMLU_JSONL.value else ["--synthetic_subjects=8"]
    )
    mmlu_args = ["--models=gpt2", "--questions=8", "--skip_harness", "--second_process=false", bf16]
    return {
        "tests": [("tests", tests)],
        "train": [("train", bench("train", *train))],
        "forward": [
            (
                "forward",
                bench("forward", "--tasks=forward", "--model=all", "--xla_backends=ynn", bf16, "--iters=5", *peak),
            )
        ],
        "generate": [
            (f"generate_{m}", bench("generate", "--sections=torch", f"--model={m}", "--batches=1,8", "--iters=3", bf16))
            for m in ("gpt2", "llama1b")
        ],
        "mmlu": [("mmlu", bench("mmlu", *mmlu_args, *([] if smoke else mmlu_data)))],
    }


def main(argv):
    del argv
    unknown = set(_SECTIONS.value) - set(SECTIONS)
    if unknown:
        raise app.UsageError(f"unknown --sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    budgets = dict(item.split("=") for item in _BUDGETS.value)
    if not _SMOKE.value and not has_gpu():
        sys.exit(
            "error: benchmarks/gpu_check.py found no GPU for JAX (jax.devices('gpu')): run it on a machine with an "
            "NVIDIA GPU, in an environment with imitax's gpu extra (pip install -e '.[gpu]'), or pass --smoke"
        )
    gpu_name, lines = facts()
    print("\n".join(lines), flush=True)
    log_dir = _LOGS.value or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    test_env = dict(env, JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_PLATFORMS="cpu" if _SMOKE.value else "cuda,cpu")

    rows, failed = [], []
    start = time.perf_counter()
    for section, runs in commands(_SMOKE.value).items():
        if section not in _SECTIONS.value:
            continue
        for name, command in runs:
            run = run_section(name, command, test_env if section == "tests" else env, float(budgets[section]), log_dir)
            if run.failure:
                failed.append(name)
            rows += ROWS[section](run, gpu_name)

    title = f"GPU check on {gpu_name}" + (" (--smoke: tiny shapes, not a measurement)" if _SMOKE.value else "")
    report = [
        f"## {title}",
        "",
        common.format_table(["what", "target", "measured", "met"], rows),
        "",
        *(f"- {line}" for line in lines),
        f"- sections' logs: {log_dir}; {time.perf_counter() - start:.0f} s in all"
        + (f"; failed or timed out: {', '.join(failed)}" if failed else ""),
    ]
    print("\n" + "\n".join(report))
    if _OUT.value:
        from imitax import records

        records.write_lines(_OUT.value, [line + "\n" for line in report])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app.run(main)
