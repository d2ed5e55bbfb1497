"""A system's answers generated when the study is created: from an OpenAI-compatible URL or a model path.

The asking is imitax.collect's (``open_teacher`` serves a model path in-process through
imitax.serve, ``Teacher`` is the official ``openai`` client with its retries): every prompt is
answered once, single-turn, before anything is written, so a failure leaves the database as it was.
"""

from __future__ import annotations

import asyncio

import openai

from imitax.collect.client import RateLimiter, Sampling, Teacher, TeacherError, describe, open_teacher
from imitax.collect.prompts import Prompt
from imitax.rate.store import StudyError


async def _answer_all(teacher: Teacher, prompts: dict[str, str], concurrency: int) -> dict[str, str]:
    limiter, gate = RateLimiter(), asyncio.Semaphore(concurrency)

    async def one(key: str, text: str) -> tuple[str, str]:
        async with gate:
            record = await teacher.answer(Prompt(id=key, turns=(text,)), limiter)
            return key, record["conversations"][-1]["value"]

    try:
        await teacher.check()
        return dict(await asyncio.gather(*(one(k, t) for k, t in prompts.items())))
    finally:
        await teacher.close()


def generate_answers(
    system: str,
    source: str,
    prompts: dict[str, str],
    model: str | None = None,
    max_tokens: int = 512,
    concurrency: int = 8,
) -> dict[str, str]:
    """``{prompt id: answer}`` from ``source`` (greedy, at most ``max_tokens`` tokens per answer).

    Raises:
      StudyError: the endpoint cannot be used, or a request still failed after the client's retries.
    """
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0)
    try:
        with open_teacher(source) as base_url:
            return asyncio.run(_answer_all(Teacher(base_url, model, sampling=sampling), prompts, concurrency))
    except TeacherError as e:
        hint = f" (rate.py names it with --served_model={system}=MODEL)" if "--model" in str(e) else ""
        raise StudyError(f"--system={system}={source}: {e}{hint}") from None
    except openai.OpenAIError as e:
        raise StudyError(f"--system={system}={source}: generating answers failed ({describe(e)[0]})") from None
