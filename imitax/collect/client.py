"""Asking a teacher: the official ``openai`` async client, bounded concurrency, rate limits, a resumable loop.

Retries are the ``openai`` client's own (``max_retries``): exponential backoff from 0.5 s up to
8 s with up to 25% jitter on 408, 409, 429, 5xx, timeouts and dropped connections, honouring the
server's ``Retry-After`` (up to two minutes). What is still failing after them is a *final failure*:
appended to the failures file (``{"id", "error", "status"}``) and asked for again on the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import openai

from imitax import records
from imitax.collect.prompts import Prompt
from imitax.collect.store import Store


class TeacherError(RuntimeError):
    """The teacher cannot be used at all (unreachable, refuses the key, does not know the model)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling settings sent with every request (None: not sent, the endpoint's default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"--max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")

    def request(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits: two token buckets refilled continuously.

    Hand-written because the one kept async limiter (``aiolimiter``) is not a dependency and limits
    one quantity; a request here must wait until both its request and its estimated tokens fit.
    A limit of 0 is no limit; a request larger than the whole token budget waits for a full bucket.
    ``clock`` and ``sleep`` are the time source and the wait (the tests pass ones that jump).
    """

    def __init__(
        self,
        rpm: float = 0,
        tpm: float = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ):
        if rpm < 0 or tpm < 0:
            raise ValueError(f"--rpm and --tpm must be >= 0 (0: no limit), got {rpm} and {tpm}")
        self.limits = (float(rpm), float(tpm))
        self.levels = list(self.limits)  # both buckets start full
        self.clock, self.stamp, self.sleep = clock, clock(), sleep or asyncio.sleep
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        for i, limit in enumerate(self.limits):
            self.levels[i] = min(limit, self.levels[i] + (now - self.stamp) * limit / 60)
        self.stamp = now

    async def acquire(self, tokens: float) -> None:
        async with self._lock:  # one waiter at a time: requests go out in the order they asked
            need = (1.0, float(tokens))
            while True:
                self._refill()
                waits = [
                    (min(n, limit) - level) * 60 / limit
                    for n, limit, level in zip(need, self.limits, self.levels, strict=True)
                    if limit > 0 and level < min(n, limit)
                ]
                if not waits:
                    break
                await self.sleep(max(waits))
            for i, limit in enumerate(self.limits):
                if limit > 0:
                    self.levels[i] -= min(need[i], limit)


def estimate_tokens(messages: Sequence[dict[str, str]], max_tokens: int | None) -> int:
    """What a request may cost against a tokens-per-minute limit: ~4 characters a token, plus the answer."""
    return sum(len(m["content"]) for m in messages) // 4 + (max_tokens or 256)


def describe(error: BaseException) -> tuple[str, int | None]:
    """``(one line, HTTP status or None)`` for a failed request; never includes headers (the key)."""
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {error.message}".splitlines()[0], error.status_code
    return f"{type(error).__name__}: {error}".splitlines()[0], None


@contextlib.contextmanager
def open_teacher(teacher: str, **serve_kwargs) -> Iterator[str]:
    """The base URL of ``teacher``: a ``http(s)://`` URL as given, or a local model served in-process.

    ``serve_kwargs`` go to :func:`imitax.serve.serving` (``template``, ``max_batch``, ``max_len``)
    when ``teacher`` is a model path (anything ``scripts/evaluate.py`` accepts).

    Raises:
      TeacherError: ``teacher`` is neither a URL nor an existing path.
    """
    if teacher.startswith(("http://", "https://")):
        yield teacher
        return
    if not os.path.exists(teacher):
        raise TeacherError(f"--teacher={teacher} is neither an http(s):// URL nor an existing model path")
    from imitax.serve import serving  # imports JAX: only for a local teacher

    with serving(teacher, **serve_kwargs) as url:
        yield url


class Teacher:
    """An OpenAI-compatible chat endpoint and how to ask it (one ``AsyncOpenAI`` client)."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        sampling: Sampling = Sampling(),
        max_retries: int = 5,
        timeout: float = 600.0,
    ):
        self.base_url, self.model, self.sampling = base_url, model, sampling
        # Endpoints without keys (a local server, vLLM) ignore it; the client insists on a string.
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "EMPTY", max_retries=max_retries, timeout=timeout
        )

    async def check(self) -> str:
        """Asks ``/v1/models`` once; returns the model to use (``model``, or the endpoint's only one).

        Raises:
          TeacherError: unreachable, the key refused, or the model unknown or not given when needed.
        """
        try:
            served = [m.id async for m in self._client.models.list()]
        except openai.APIConnectionError as e:
            raise TeacherError(f"{self.base_url} is unreachable ({describe(e)[0]}); start it or fix the URL") from None
        except openai.AuthenticationError as e:
            raise TeacherError(
                f"teacher {self.base_url} refused the API key ({describe(e)[0]}); export it in the variable "
                "--api_key_env names (default OPENAI_API_KEY)"
            ) from None
        except openai.NotFoundError:
            served = []  # an endpoint without /v1/models: the model must be named
        except openai.APIStatusError as e:
            raise TeacherError(f"{self.base_url} failed to list its models ({describe(e)[0]})") from None
        if self.model is None:
            if len(served) != 1:
                listed = f"it serves {', '.join(served)}" if served else "it does not list its models"
                raise TeacherError(f"pass --model=NAME: {listed}")
            self.model = served[0]
        elif served and self.model not in served:
            raise TeacherError(f"teacher {self.base_url} does not serve model {self.model!r}; it serves {served}")
        return self.model

    async def answer(self, prompt: Prompt, limiter: RateLimiter) -> dict[str, Any]:
        """The teacher's answer to every user turn of ``prompt`` in order, each seeing the earlier answers."""
        answers, usage, finish, start = [], {"prompt_tokens": 0, "completion_tokens": 0}, [], time.monotonic()
        model = self.model
        for _ in prompt.turns:
            messages = prompt.messages(answers)
            await limiter.acquire(estimate_tokens(messages, self.sampling.max_tokens))
            response = await self._client.chat.completions.create(
                model=self.model, messages=messages, **self.sampling.request()
            )
            if not response.choices:
                raise ValueError(f"the teacher's reply has no choices: {response.model_dump_json()[:200]}")
            choice = response.choices[0]
            answers.append(choice.message.content or "")
            finish.append(choice.finish_reason)
            model = response.model or model
            if response.usage is not None:
                usage["prompt_tokens"] += response.usage.prompt_tokens
                usage["completion_tokens"] += response.usage.completion_tokens
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        teacher = {
            "endpoint": self.base_url,
            "model": model,
            "sampling": self.sampling.request(),
            "usage": usage,
            "finish_reasons": finish,
            "seconds": round(time.monotonic() - start, 3),
            "collected_at": records.now(),
        }
        return {"id": prompt.id, "conversations": conversations(prompt, answers), "teacher": teacher}

    async def close(self) -> None:
        await self._client.close()


def conversations(prompt: Prompt, answers: Sequence[str]) -> list[dict[str, str]]:
    """The ShareGPT turns of a collected record (what ``scripts/train.py`` reads)."""
    turns = [{"from": "system", "value": prompt.system}] if prompt.system is not None else []
    for user, answer in zip(prompt.turns, answers, strict=True):
        turns += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
    return turns


@dataclasses.dataclass
class Outcome:
    """How a run went: prompts collected now, skipped as already collected, failed, and tokens generated."""

    collected: int = 0
    skipped: int = 0
    failed: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


async def collect(
    teacher: Teacher,
    prompts: Sequence[Prompt],
    out: str | os.PathLike,
    failures: str | os.PathLike,
    concurrency: int = 16,
    limiter: RateLimiter | None = None,
    progress: bool = True,
) -> Outcome:
    """Asks ``teacher`` for every prompt not yet in ``out``, ``concurrency`` at a time; appends as they finish.

    ``failures`` is rewritten for this run: it lists the prompts that still failed after the
    client's retries (the ones a rerun asks for again), and is removed when none did.
    """
    from tqdm.auto import tqdm

    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    limiter = limiter or RateLimiter()
    outcome, start = Outcome(), time.monotonic()
    with Store(out) as store, open(failures, "w", encoding="utf-8") as failed:
        todo = [p for p in prompts if p.id not in store.done]
        outcome.skipped = len(prompts) - len(todo)
        bar = tqdm(total=len(todo), unit="prompt", desc="collect", disable=not progress, dynamic_ncols=True)
        slots = asyncio.Semaphore(concurrency)

        async def one(prompt: Prompt) -> None:
            async with slots:
                try:
                    record = await teacher.answer(prompt, limiter)
                except (openai.OpenAIError, ValueError) as e:  # retries spent, or a reply that is not an answer
                    message, status = describe(e)
                    failed.write(records.dumps({"id": prompt.id, "error": message, "status": status}) + "\n")
                    failed.flush()
                    outcome.failed += 1
                else:
                    store.append(record)
                    outcome.collected += 1
                    outcome.completion_tokens += record["teacher"]["usage"]["completion_tokens"]
            rate = outcome.completion_tokens / max(time.monotonic() - start, 1e-9)
            bar.set_postfix(failed=outcome.failed, tok_s=f"{rate:.0f}", refresh=False)
            bar.update()

        try:
            await asyncio.gather(*(one(p) for p in todo))
        finally:
            bar.close()
            await teacher.close()
    outcome.seconds = time.monotonic() - start
    if not outcome.failed:
        os.remove(failures)  # no stale list of an earlier run's failures
    return outcome
