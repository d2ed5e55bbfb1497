r"""The OpenAI-compatible server under concurrent clients vs transformers' ``generate``.

  python benchmarks/serve_benchmark.py                      # GPT-2-124M shape; writes benchmarks/results/serve.md
  python benchmarks/serve_benchmark.py --clients=1,8,32 --new_tokens=64 --prompt_len=128
  python benchmarks/serve_benchmark.py --smoke              # a 2-layer model: checks that the script runs

The model: GPT-2-124M shaped (12 layers, 768 wide, 50,257-token vocabulary), random weights
from a transformers config (float32), saved as a Hugging Face directory with the test
tokenizer. The prompts: consecutive ``--prompt_len``-token windows of docs/design.md (real
text), sent as token ids so every request has exactly that many.

The server: ``scripts/serve.py`` in its own process (``--max_batch`` = the most clients,
``--max_len`` = prompt + new tokens rounded up), warmed up before anything is timed. For
each ``--clients`` level, that many clients each send ``--requests`` streamed greedy
completions one after another (``ignore_eos``: exactly ``--new_tokens`` each) through
httpx. Per request: time to first token (request sent -> first token's chunk) and time per
output token ((last chunk - first chunk) / (tokens - 1)); per level: generated tokens over
the level's wall time.

The reference: transformers' ``model.generate(do_sample=False)`` on the same prompts and
weights, in this process, at batch 1 and at batch 8 (``--torch_prompts`` prompts each,
exactly ``--new_tokens`` tokens per row); its time to first token is a whole prefill plus
one step of the batch, its time per token the rest over the remaining tokens.

The machine is shared: the load average is printed before and after, and ratios are
between runs of this one invocation.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from benchmarks import common  # noqa: E402

_CLIENTS = flags.DEFINE_list("clients", ["1", "8", "32"], "Concurrent client counts (one table row each).")
_REQUESTS = flags.DEFINE_integer("requests", 2, "Requests each client sends, one after another.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per request.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Generated tokens per request.")
_TORCH_BATCHES = flags.DEFINE_list("torch_batches", ["1", "8"], "transformers generate batch sizes.")
_TORCH_PROMPTS = flags.DEFINE_integer("torch_prompts", 8, "Prompts transformers generates for at each batch size.")
_CHUNK = flags.DEFINE_integer("chunk", 128, "The server's --chunk.")
_SMOKE = flags.DEFINE_bool("smoke", False, "A 2-layer 64-wide model and short runs: checks that the script runs.")
_OUT = flags.DEFINE_string("out", str(ROOT / "benchmarks" / "results" / "serve.md"), "Where the table goes.")

TOKENIZER = ROOT / "tests" / "data" / "tokenizer"
HEADERS = ["engine", "concurrency", "requests", "tokens/s", "vs torch b8", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms",
           "TPOT p99 ms"]  # fmt: skip


def save_model(directory: pathlib.Path, smoke: bool) -> transformers.PreTrainedModel:
    widths = dict(n_embd=64, n_layer=2, n_head=4) if smoke else dict(n_embd=768, n_layer=12, n_head=12)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=1024, **widths)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(directory)
    return model


def make_prompts(count: int, length: int) -> list[list[int]]:
    """Consecutive ``length``-token windows of docs/design.md (repeated if it runs out)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    ids = tokenizer((ROOT / "docs" / "design.md").read_text())["input_ids"]
    while len(ids) < count * length:
        ids = ids + ids
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- transformers --------------------------------------------------------------------------------


class _Clock(BaseStreamer):
    """Records when ``generate`` hands over each new token (its first call is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def torch_run(model, prompts: list[list[int]], batch: int, new_tokens: int) -> dict:
    """Greedy generate over ``prompts`` in batches (all the same length: no padding), each token timed."""
    ttft, tpot, total, wall = [], [], 0, 0.0
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i : i + batch])
        clock = _Clock()
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0, eos_token_id=None, streamer=clock)  # fmt: skip
            wall += time.perf_counter() - start
        assert out.shape[1] == ids.shape[1] + new_tokens and len(clock.times) == new_tokens + 1
        first, last = clock.times[1], clock.times[-1]
        ttft += [first - start] * len(ids)
        tpot += [(last - first) / (new_tokens - 1)] * len(ids)
        total += len(ids) * new_tokens
    return {"tokens": total, "wall": wall, "ttft": ttft, "tpot": tpot, "requests": len(prompts)}


# -- the server ----------------------------------------------------------------------------------


def start_server(model_dir: pathlib.Path, max_batch: int, max_len: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(ROOT / "scripts" / "serve.py"), f"--model={model_dir}", "--port=0",
               f"--max_batch={max_batch}", f"--max_len={max_len}", f"--chunk={_CHUNK.value}"]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("serving "):
            return proc, line.split(" on ")[1].strip()
    raise RuntimeError(f"the server exited with status {proc.wait()}")


async def one_request(client, url: str, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
    body = {"model": "gpt2", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    sent = time.perf_counter()
    times = []
    async with client.stream("POST", url + "/completions", json=body, timeout=None) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:  # one chunk per token
                times.append(time.perf_counter())
    assert len(times) == new_tokens, len(times)
    return times[0] - sent, (times[-1] - times[0]) / max(1, len(times) - 1), len(times)


async def server_level(url: str, prompts: list[list[int]], clients: int, requests: int, new_tokens: int) -> dict:
    import httpx

    results = []

    async def client_loop(c: int, client):
        for r in range(requests):
            results.append(await one_request(client, url, prompts[(c * requests + r) % len(prompts)], new_tokens))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
        wall = time.perf_counter() - start
    return {
        "tokens": sum(n for _, _, n in results),
        "wall": wall,
        "ttft": [t for t, _, _ in results],
        "tpot": [t for _, t, _ in results],
        "requests": len(results),
    }


def row(name: str, concurrency: int, result: dict, torch_b8: float | None) -> list:
    rate = result["tokens"] / result["wall"]
    return [
        name,
        concurrency,
        result["requests"],
        f"{rate:.1f}",
        f"{rate / torch_b8:.2f}x" if torch_b8 else "1.00x",
        f"{percentile(result['ttft'], 50):.2f}",
        f"{percentile(result['ttft'], 99):.2f}",
        f"{1000 * percentile(result['tpot'], 50):.0f}",
        f"{1000 * percentile(result['tpot'], 99):.0f}",
    ]


def main(argv):
    del argv
    smoke = _SMOKE.value
    clients = [int(c) for c in _CLIENTS.value]
    new_tokens, prompt_len = (8, 16) if smoke else (_NEW_TOKENS.value, _PROMPT_LEN.value)
    requests = 1 if smoke else _REQUESTS.value
    lines = [f"load average at start: {os.getloadavg()}", common.environment()]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = pathlib.Path(tmp) / "gpt2"
        torch_model = save_model(model_dir, smoke)
        prompts = make_prompts(max(max(clients) * requests, _TORCH_PROMPTS.value), prompt_len)
        max_len = -(-(prompt_len + new_tokens) // 64) * 64
        started = time.perf_counter()
        proc, url = start_server(model_dir, max(clients), max_len)
        lines.append(f"server ready (load + compile) {time.perf_counter() - started:.1f} s after start")
        try:
            rows, torch_b8 = [], None
            for batch in (int(b) for b in _TORCH_BATCHES.value):
                result = torch_run(torch_model, prompts[: _TORCH_PROMPTS.value], batch, new_tokens)
                rate = result["tokens"] / result["wall"]
                torch_b8 = rate if batch == 8 else torch_b8
                rows.append(row("transformers generate", batch, result, None))
                print(rows[-1], flush=True)
            for r in rows:  # ratios against batch 8, once it is known
                r[4] = f"{float(r[3]) / torch_b8:.2f}x" if torch_b8 else "-"
            import httpx

            while httpx.get(url.removesuffix("/v1") + "/health").status_code != 200:
                time.sleep(0.5)
            for c in clients:
                result = asyncio.run(server_level(url, prompts, c, requests, new_tokens))
                rows.append(row("imitax serve", c, result, torch_b8))
                print(rows[-1], flush=True)
            health = httpx.get(url.removesuffix("/v1") + "/health").json()
        finally:
            proc.terminate()
            proc.wait()
    model = "GPT-2 2-layer 64-wide (smoke)" if smoke else "GPT-2-124M shape, random weights, float32"
    lines += [
        f"model: {model}; prompts: {prompt_len} tokens of docs/design.md; {new_tokens} greedy tokens each",
        f"server: --max_batch={max(clients)} --max_len={max_len} --chunk={_CHUNK.value}; steps {health['steps']}, "
        f"cache compactions {health['compactions']}",
        "",
        common.format_table(HEADERS, rows),
        "",
        f"load average at end: {os.getloadavg()}",
    ]
    text = "\n".join(lines)
    print(text)
    if not smoke:
        pathlib.Path(_OUT.value).write_text(text + "\n")
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
