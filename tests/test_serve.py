"""scripts/serve.py on a tiny random LLaMA: greedy outputs against imitax's generate and transformers,
the official openai client, logprobs against transformers, every bad input, the API key and SIGTERM.

One server process serves the whole module (started once; the SIGTERM test, last, ends it).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers
from hf_models import randomize, tiny_hf_config
from train_helpers import subprocess_env

from imitax.data import templates
from imitax.data.formats import USER, Conversation

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "data" / "tokenizer"
KEY = "test-key-123"
MAX_LEN, MAX_BATCH, MAX_WAITING, CHUNK = 160, 8, 4, 16
NEW_TOKENS = 24
# Longer than CHUNK: those prompts are prefilled over two or three steps.
PROMPT_LENGTHS = (5, 23, 40, 9, 17, 31, 12, 3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random LLaMA with the test tokenizer (300 ids), saved as a Hugging Face directory."""
    config = tiny_hf_config("llama")
    config.vocab_size, config.max_position_embeddings = 320, 512
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    path = tmp_path_factory.mktemp("serve") / "tiny-llama"
    model.save_pretrained(path, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def torch_model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def _serve_command(model_dir, *flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "serve.py"), f"--model={model_dir}", *flags]


@pytest.fixture(scope="module")
def server(model_dir):
    """``(process, base_url)`` of scripts/serve.py on a free loopback port, with an API key."""
    env = subprocess_env(1, SERVE_TEST_KEY=KEY, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    flags = [
        "--port=0",
        f"--max_len={MAX_LEN}",
        f"--max_batch={MAX_BATCH}",
        f"--max_waiting={MAX_WAITING}",
        f"--chunk={CHUNK}",
        "--api_key_env=SERVE_TEST_KEY",
    ]
    proc = subprocess.Popen(
        _serve_command(model_dir, *flags),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line = proc.stdout.readline()
    while line and "serving" not in line:
        line = proc.stdout.readline()
    assert "serving 'tiny-llama' on http://127.0.0.1:" in line, line
    base_url = line.split(" on ")[1].strip()
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(base_url.removesuffix("/v1") + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield proc, base_url
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1], api_key=KEY, max_retries=0)


def _post(server, path: str, body, *, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server[1] + path, content=content, headers=headers, timeout=60, **kwargs)


def _prompts() -> list[list[int]]:
    rs = np.random.RandomState(0)
    return [rs.randint(1, 300, n).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(torch_model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def references(model_dir, torch_model):
    """Greedy continuations of :func:`_prompts` from imitax's generate and from transformers."""
    from imitax import convert
    from imitax.eval import generate

    model = convert.load_hf(model_dir)
    prompts = _prompts()
    ours = [generate(model, [p], max_new_tokens=NEW_TOKENS)[0] for p in prompts]
    theirs = [_hf_greedy(torch_model, p) for p in prompts]
    assert len({t for row in theirs for t in row}) > 10, "degenerate reference: the test would prove little"
    return ours, theirs


def _greedy_ids(server, prompt: list[int], **extra) -> list[int]:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    response = _post(server, "/completions", {**body, "ignore_eos": True, "return_token_ids": True, **extra})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def test_engine_chunks_and_compaction_keep_greedy_outputs(model_dir, references):
    """In-process: 3 slots, 8-token chunks and a short cache, so prompts span up to 5 chunks, slots start
    prompts while others decode, and the cache is compacted several times; greedy rows stay exact."""
    from imitax import convert
    from imitax.serve import Engine, SamplingParams

    ours, _ = references
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    engine = Engine(convert.load_hf(model_dir), tokenizer, max_batch=3, max_len=72, chunk=8, prefill_rows=2, headroom=8)
    engine.start()
    try:
        greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        sampled = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)
        handles = [engine.submit(p, greedy) for p in _prompts()]
        handles += [engine.submit(p, sampled) for p in _prompts()[:4]]
        got = [[t for event in h for t in event.tokens] for h in handles]
    finally:
        engine.stop()
    assert got[:8] == ours
    assert all(len(g) == NEW_TOKENS for g in got[8:])
    assert engine.compactions >= 2, engine.compactions


def test_greedy_alone_equals_generate_and_transformers(server, references):
    ours, theirs = references
    for prompt, want_ours, want_theirs in zip(_prompts()[:3], ours, theirs, strict=False):
        got = _greedy_ids(server, prompt)
        assert got == want_ours
        assert got == want_theirs


def test_greedy_with_seven_others_in_flight(server, references):
    """Eight at once (some sampled, some stopping early) into eight slots: the greedy ones do not change."""
    ours, _ = references
    prompts = _prompts()
    extras = [{}, {"temperature": 1.0, "seed": 1}, {}, {"max_tokens": 3}, {}, {"temperature": 0.7, "top_k": 5}, {}, {}]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_greedy_ids, server, p, **e) for p, e in zip(prompts, extras, strict=True)]
        got = [f.result() for f in futures]
    for i, extra in enumerate(extras):
        if not extra:
            assert got[i] == ours[i], f"prompt {i}"
    assert len(got[3]) == 3


def _chat_prompt(tokenizer, text: str) -> list[int]:
    return templates.encode_prompt(Conversation(turns=((USER, text),)), tokenizer, "koala").tolist()


def test_openai_chat_completions_and_models(client, model_dir, tokenizer):
    from imitax import convert
    from imitax.eval import generate

    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    reply = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    # The koala prompt (the trainer's template), decoded greedily by imitax's generate.
    prompt = _chat_prompt(tokenizer, "What is the capital of France?")
    want = generate(convert.load_hf(model_dir), [prompt], max_new_tokens=12)[0]
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(want, skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == len(prompt) + 12

    text = client.completions.create(model="tiny-llama", prompt="Once upon a time", max_tokens=8, temperature=0)
    want = generate(convert.load_hf(model_dir), [tokenizer("Once upon a time")["input_ids"]], max_new_tokens=8)[0]
    eos = tokenizer.eos_token_id
    assert text.object == "text_completion" and text.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
    assert text.choices[0].finish_reason == ("stop" if eos in want else "length")
    assert text.usage.completion_tokens == len(want)


def test_openai_streaming_equals_the_whole_answer(client):
    kwargs = dict(model="tiny-llama", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(messages=messages, **kwargs)
    chunks = list(
        client.chat.completions.create(messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    whole = client.completions.create(prompt="abc", **kwargs)
    streamed = client.completions.create(prompt="abc", stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_logprobs_match_transformers(server, torch_model):
    prompt = _prompts()[1]
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 5}
    response = _post(server, "/completions", {**body, "ignore_eos": True, "return_token_ids": True})
    choice = response.json()["choices"][0]
    ids, logprobs = choice["token_ids"], choice["logprobs"]
    with torch.no_grad():
        logits = torch_model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
    want = torch.log_softmax(logits.double(), dim=-1).numpy()
    np.testing.assert_allclose(logprobs["token_logprobs"], want[np.arange(len(ids)), ids], atol=2e-4)
    for step, top in enumerate(logprobs["top_logprobs"]):
        assert len(top) <= 5  # several ids may decode to one string (partial UTF-8): fewer keys then
        np.testing.assert_allclose(max(top.values()), np.sort(want[step])[-1], atol=2e-4)
    # The chat API's per-token objects carry every top id separately.
    chat = _post(
        server,
        "/chat/completions",
        {
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 4,
            "return_token_ids": True,
            "ignore_eos": True,
        },  # fmt: skip
    ).json()["choices"][0]
    assert [len(t["top_logprobs"]) for t in chat["logprobs"]["content"]] == [4, 4, 4]
    for t in chat["logprobs"]["content"]:
        assert t["logprob"] == pytest.approx(t["top_logprobs"][0]["logprob"])  # greedy: the chosen is the top


def test_sampling_n_seed_and_stop(client):
    kwargs = dict(model="tiny-llama", prompt="The", max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    first = client.completions.create(n=3, seed=7, **kwargs)
    again = client.completions.create(n=3, seed=7, **kwargs)
    other = client.completions.create(n=3, seed=8, **kwargs)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and first.usage.completion_tokens == 48
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1 and texts != [c.text for c in other.choices]

    greedy = client.completions.create(**{**kwargs, "temperature": 0}).choices[0].text
    stop = greedy[5:8]
    cut = client.completions.create(**{**kwargs, "temperature": 0}, stop=[stop]).choices[0]
    assert cut.text == greedy[: greedy.find(stop)] and cut.finish_reason == "stop"


GOOD = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}
BAD = {
    "malformed JSON": (b'{"model": "tiny-llama", "prompt": ', 400),
    "unknown model": ({**GOOD, "model": "gpt-9"}, 404),
    "max_tokens beyond the context": ({**GOOD, "max_tokens": MAX_LEN}, 400),
    "negative temperature": ({**GOOD, "temperature": -0.5}, 400),
    "top_p 0": ({**GOOD, "top_p": 0.0}, 400),
    "top_p above 1": ({**GOOD, "top_p": 1.5}, 400),
    "wrong field type": ({**GOOD, "max_tokens": "many"}, 400),
    "oversized body": ({**GOOD, "prompt": "x" * (5 << 20)}, 413),
    "suffix": ({**GOOD, "suffix": "end"}, 400),
    "best_of": ({**GOOD, "best_of": 3}, 400),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_an_openai_error_and_the_server_goes_on(server, case):
    body, status = BAD[case]
    response = _post(server, "/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert _post(server, "/completions", GOOD).status_code == 200


def test_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}], temperature=-1)


def test_too_many_in_flight_is_429_and_the_rest_are_served(server):
    """A stream of MAX_BATCH + MAX_WAITING choices fills the server: one more request waits for nothing."""
    body = {**GOOD, "n": MAX_BATCH + MAX_WAITING, "max_tokens": 60, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server[1] + "/completions", json=body, headers=headers, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        busy = _post(server, "/completions", GOOD)
        assert busy.status_code == 429 and busy.headers["retry-after"]
        assert busy.json()["error"]["type"] == "rate_limit_error"
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"
    finished = [json.loads(line[5:])["choices"][0] for line in rest[:-1]]
    assert sum(c["finish_reason"] == "length" for c in finished) == MAX_BATCH + MAX_WAITING
    assert _post(server, "/completions", GOOD).status_code == 200


def test_api_key_is_required(server):
    for key in (None, "wrong"):
        response = _post(server, "/completions", GOOD, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server[1] + "/models").status_code == 401
    assert _post(server, "/completions", GOOD).status_code == 200


def _hf_greedy_penalized(torch_model, prompt: list[int], new_tokens: int, presence: float, frequency: float):
    """Greedy tokens and their raw log-probabilities, step by step from transformers' logits with OpenAI's
    penalties applied by hand: ``logits[t] -= presence * (count[t] > 0) + frequency * count[t]``."""
    generated, logprobs = [], []
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = torch_model(torch.tensor([prompt + generated])).logits[0, -1].double()
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[0]).double()
        token = int((logits - presence * (counts > 0) - frequency * counts).argmax())
        generated.append(token)
        logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
    return generated, logprobs


def test_logit_bias_bans_and_forces_tokens_as_transformers(server, client, torch_model, references):
    """A request's bias moves its own greedy choices only (a plain request in flight beside it keeps its
    output); the biased output equals transformers' generate with the same bias (its sequence_bias)."""
    ours, _ = references
    prompt, plain = _prompts()[0], ours[0]
    boost = next(t for t in range(3, 300) if t not in plain)
    bias = {plain[0]: -100.0, plain[2]: -100.0, boost: 3.0}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        biased = pool.submit(_greedy_ids, server, prompt, logit_bias={str(t): b for t, b in bias.items()})
        beside = pool.submit(_greedy_ids, server, prompt)
        got, unbiased = biased.result(), beside.result()
    assert unbiased == plain
    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
            sequence_bias={(t,): b for t, b in bias.items()},
        )  # fmt: skip
    assert got == out[0, len(prompt) :].tolist()
    assert got != plain and plain[0] not in got and plain[2] not in got
    # +100 outweighs every logit gap of this model: each token is the forced one (the official client's field).
    forced = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=6, temperature=0, logit_bias={str(boost): 100},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert forced.choices[0].model_extra["token_ids"] == [boost] * 6


def test_presence_and_frequency_penalties_match_transformers_step_by_step(server, torch_model, references):
    """Positive and negative penalties side by side (different slots), then again one after the other in the
    same slot (its counts cleared for the new choice); the log-probabilities stay the model's own."""
    ours, _ = references
    prompt = _prompts()[2]
    settings = [(1.5, 0.7), (-1.0, -2.0)]
    want = [_hf_greedy_penalized(torch_model, prompt, 12, p, f) for p, f in settings]
    assert want[0][0] != ours[2][:12] and want[1][0] != ours[2][:12], "the penalties would change nothing"

    def penalized(presence, frequency):
        body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1}
        body.update(presence_penalty=presence, frequency_penalty=frequency, ignore_eos=True, return_token_ids=True)
        response = _post(server, "/completions", body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["token_ids"], choice["logprobs"]["token_logprobs"]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda s: penalized(*s), settings))
    apart = [penalized(*s) for s in settings]
    for (ids, logprobs), (want_ids, want_logprobs) in zip(together + apart, want + want, strict=True):
        assert ids == want_ids
        np.testing.assert_allclose(logprobs, want_logprobs, atol=2e-4)


REFUSED = {
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools are not supported"),
    "tool_choice": ({"tool_choice": "auto"}, "tool_choice is not supported"),
    "functions": ({"functions": [{"name": "f"}]}, "functions are not supported"),
    "response_format": ({"response_format": {"type": "json_object"}}, "response_format 'json_object' is not"),
    "logit_bias word key": ({"logit_bias": {"hello": 5}}, "logit_bias keys must be token ids (decimal"),
    "logit_bias id beyond the vocabulary": (
        {"logit_bias": {"320": 5}},
        "logit_bias keys must be token ids in [0, 320)",
    ),
    "logit_bias value": ({"logit_bias": {"5": 100.5}}, "logit_bias value for token 5 must be in [-100, 100]"),
    "logit_bias too many": ({"logit_bias": {str(t): 1 for t in range(301)}}, "at most 300"),
    "presence_penalty": ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
    "frequency_penalty": ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3"),
    "vLLM's repetition_penalty": ({"repetition_penalty": 1.2}, "repetition_penalty is not supported"),
    "vLLM's guided decoding": ({"guided_json": {"type": "object"}}, "guided_json is not supported"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_and_out_of_range_settings_are_refused(server, case):
    extra, message = REFUSED[case]
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = _post(server, "/chat/completions", {**chat, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    fine = {"response_format": {"type": "text"}, "tool_choice": "none", "repetition_penalty": 1.0, "user": "u"}
    fine["logit_bias"] = {"5": -100}
    assert _post(server, "/chat/completions", {**chat, **fine}).status_code == 200


def test_programs_compiled_once_at_start(server):
    """Every request so far (prompt lengths 2-40, 1-12 choices, greedy and sampled) ran the programs warmup compiled."""
    health = httpx.get(server[1].removesuffix("/v1") + "/health").json()
    assert health["compiled"] == len(health["programs"]) == 5  # decode, compact, prefill at 1, 2 and 4 rows
    assert health["compactions"] >= 1 and health["in_flight"] == 0


def test_bad_flags_are_one_line_and_exit_1(model_dir, tmp_path):
    env = subprocess_env(1)
    env.pop("NO_SUCH_KEY_VAR", None)
    missing_key = subprocess.run(
        _serve_command(model_dir, "--api_key_env=NO_SUCH_KEY_VAR"), env=env, capture_output=True, text=True
    )
    assert missing_key.returncode == 1
    assert missing_key.stderr.strip().splitlines()[-1] == (
        "serve.py: error: --api_key_env=NO_SUCH_KEY_VAR: that environment variable is not set or empty; export it"
    )
    no_model = subprocess.run(_serve_command(tmp_path / "nothing"), env=env, capture_output=True, text=True)
    assert no_model.returncode == 1
    assert no_model.stderr.strip().splitlines()[-1].startswith("serve.py: error: ")
    assert "no such model directory" in no_model.stderr


def test_sigterm_finishes_the_request_in_flight_then_exits(server):
    """Last: it ends the module's server."""
    proc, base_url = server
    body = {**GOOD, "max_tokens": MAX_LEN - 10, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", base_url + "/completions", json=body, headers=headers, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        os.kill(proc.pid, signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][5:])["choices"][0]["finish_reason"] == "length"
    # uvicorn, once drained, re-raises the signal it caught: the process ends as SIGTERM's default would.
    assert proc.wait(timeout=60) == -signal.SIGTERM
