"""The OpenAI-compatible HTTP API over an :class:`~imitax.serve.engine.Engine` (FastAPI).

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent
events with ``"stream": true``), ``GET /v1/models``, ``GET /health``. Requests and responses
follow the OpenAI API's schemas, so the official ``openai`` client works unchanged; as in vLLM,
``top_k``, ``ignore_eos`` and ``return_token_ids`` may be passed too (the client's
``extra_body``). What the server does not implement (tools and functions, a ``response_format``
other than text) is refused with 400, never ignored: a sample collected from it is what was
asked for. Errors are OpenAI error objects, ``{"error": {"message", "type", "param",
"code"}}``, with status 400 (malformed JSON, bad settings, too long, unsupported), 401 (API key), 404
(unknown model), 413 (body too large) or 429 (too many requests in flight, with
``Retry-After``); the request fails alone and the server goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from imitax.data import templates
from imitax.data.formats import TEACHER, USER, Conversation
from imitax.serve.engine import TOP_LOGPROBS, Engine, EngineBusy, EngineError, SamplingParams, TokenEvent

__all__ = ["MAX_BODY_BYTES", "create_app"]

MAX_BODY_BYTES = 4 << 20  # request bodies beyond this are refused with 413


class ApiError(Exception):
    """An OpenAI error object and its HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# -- request schemas ------------------------------------------------------------------------------


# vLLM's sampling extensions this server does not implement, with the value that changes nothing:
# a request giving another value is refused, as a researcher moving from vLLM would otherwise get
# samples that silently differ from what was asked for.
_VLLM_UNSUPPORTED = {
    "repetition_penalty": 1.0,
    "min_p": 0.0,
    "min_tokens": 0,
    "length_penalty": 1.0,
    "use_beam_search": False,
    "stop_token_ids": [],
    "bad_words": [],
    "allowed_token_ids": None,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "truncate_prompt_tokens": None,
    "prompt_logprobs": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "structured_outputs": None,
}


class _Sampling(pydantic.BaseModel):
    """The settings both endpoints share (other fields are ignored, as OpenAI's server does, except
    vLLM's sampling extensions in :data:`_VLLM_UNSUPPORTED`; the tool, function and
    response-format fields are read only to refuse them)."""

    model_config = pydantic.ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        """Raises a 400 for what this server would otherwise have to ignore."""
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise ApiError(
                    400, f"{name} are not supported by this server (no tool or function calling)", param=name
                )
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise ApiError(400, f"{name} is not supported by this server (no tool or function calling)", param=name)
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise ApiError(400, f"response_format {kind!r} is not supported; only 'text' is", param="response_format")
        for name, neutral in _VLLM_UNSUPPORTED.items():
            if (self.model_extra or {}).get(name, neutral) not in (neutral, None):
                raise ApiError(400, f"{name} is not supported by this server (vLLM's extension)", param=name)

    def token_bias(self) -> dict[int, float]:
        """``logit_bias`` with its keys (JSON object keys are strings) read as token ids."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdecimal():
                raise ApiError(400, f"logit_bias keys must be token ids (decimal integers), got {key!r}",
                               param="logit_bias")  # fmt: skip
            bias[int(key)] = value
        return bias

    def params(self, max_tokens: int | None, logprobs: bool) -> SamplingParams:
        self.refuse_unsupported()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            stop=tuple(s for s in stop if s),
            seed=self.seed,
            n=self.n,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            logit_bias=self.token_bias(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
        )


class _Message(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[_Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # the completions API's default
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# -- the app ----------------------------------------------------------------------------------------


def create_app(
    engine: Engine,
    model_name: str,
    *,
    template: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving ``engine`` as the model ``model_name``.

    Args:
      engine: a started engine.
      model_name: the one model name requests must give (``/v1/models`` lists it).
      template: how chat messages become a prompt: ``koala``, ``vicuna``, ``chatml`` or
        ``chat_template`` (:mod:`imitax.data.templates`, as in training); default: the
        tokenizer's chat template if it has one, else ``koala`` (the trainer's default).
      api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
      max_body_bytes: larger request bodies get 413.
    """
    tokenizer = engine.tokenizer
    if template is None:
        template = "chat_template" if getattr(tokenizer, "chat_template", None) else "koala"
    encoder = templates.Encoder(tokenizer, template)  # checks the template against the tokenizer now
    created = int(time.time())
    app = FastAPI(title="imitax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.template, app.state.model_name = engine, template, model_name

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error.response({"Retry-After": "1"} if error.status == 429 else None)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    async def body_of(request: Request, schema: type[pydantic.BaseModel]):
        authorize(request)
        if int(request.headers.get("content-length") or 0) > max_body_bytes:
            raise ApiError(413, f"request body larger than {max_body_bytes} bytes")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > max_body_bytes:
                raise ApiError(413, f"request body larger than {max_body_bytes} bytes")
        try:
            payload = json.loads(data)
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        try:
            body = schema.model_validate(payload)
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            param = ".".join(map(str, first["loc"]))
            raise ApiError(400, f"{param}: {first['msg']}", param=param) from None
        if body.model != model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has {model_name!r}",
                           code="model_not_found", param="model")  # fmt: skip
        return body

    def submit(prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        try:
            handle = engine.submit(prompt, params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except EngineBusy as e:
            raise ApiError(429, str(e), "rate_limit_error") from None
        except EngineError as e:
            raise ApiError(400, str(e)) from None
        return handle, events

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "in_flight": engine.in_flight(),
            "steps": engine.steps,
            "compactions": engine.compactions,
            "programs": engine.programs,
            "compiled": engine.compiled(),
        }

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "imitax"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request, ChatRequest)
        if not body.messages or body.messages[-1].role != "user":
            raise ApiError(400, "messages must end with a user message", param="messages")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in [0, {TOP_LOGPROBS}]", param="top_logprobs")
        prompt = encoder.encode_prompt(_conversation(body.messages)).tolist()
        params = _checked(body.params(body.max_completion_tokens or body.max_tokens, bool(body.top_logprobs)))
        top = (body.top_logprobs or 0) if body.logprobs else None
        reply = _Reply(tokenizer, "chat.completion", model_name, body, top, chat=True)
        handle, events = submit(prompt, params, asyncio.get_running_loop())
        return await reply.respond(handle, events)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, CompletionRequest)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise ApiError(400, "suffix (insertion) is not supported", param="suffix")
        if body.best_of not in (None, 1, body.n):
            raise ApiError(
                400, "best_of other than n is not supported; ask for n choices and rank them", param="best_of"
            )
        if body.logprobs is not None and not 0 <= body.logprobs <= TOP_LOGPROBS:
            raise ApiError(400, f"logprobs must be in [0, {TOP_LOGPROBS}]", param="logprobs")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, "send one prompt per request (or use n for several choices)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt = tokenizer(prompt)["input_ids"]
        reply = _Reply(tokenizer, "text_completion", model_name, body, body.logprobs, chat=False)
        handle, events = submit(
            list(prompt), _checked(body.params(body.max_tokens, bool(body.logprobs))), asyncio.get_running_loop()
        )
        return await reply.respond(handle, events)

    return app


def _checked(params: SamplingParams) -> SamplingParams:
    try:
        params.check()
    except EngineError as e:
        raise ApiError(400, str(e)) from None
    return params


def _conversation(messages: list[_Message]) -> Conversation:
    """The messages as a trainer conversation: system text, then user and teacher turns."""
    system = "\n".join(m.text() for m in messages if m.role in ("system", "developer")) or None
    roles = {"user": USER, "assistant": TEACHER}
    turns = tuple((roles[m.role], m.text()) for m in messages if m.role in roles)
    return Conversation(turns=turns, system=system)


class _Reply:
    """Turns a request's :class:`TokenEvent` s into an OpenAI response or its stream of chunks."""

    def __init__(self, tokenizer, kind: str, model: str, body, top: int | None, *, chat: bool):
        self.tokenizer, self.kind, self.model, self.body, self.top, self.chat = tokenizer, kind, model, body, top, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprobs(self, event: TokenEvent, offset: int) -> dict | None:
        if self.top is None:
            return None
        if self.chat:
            content = []
            for token, lp, (ids, vals) in zip(event.tokens, event.logprobs, event.top, strict=True):
                text = self._token(token)
                tops = [
                    {"token": (t := self._token(i)), "logprob": v, "bytes": list(t.encode())}
                    for i, v in zip(ids[: self.top], vals[: self.top], strict=True)
                ]
                content.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": tops})
            return {"content": content, "refusal": None}
        tokens = [self._token(t) for t in event.tokens]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": event.logprobs,
            "top_logprobs": [self._top_dict(ids, vals) for ids, vals in event.top],
            "text_offset": offsets,
        }

    def _top_dict(self, ids: list[int], vals: list[float]) -> dict[str, float]:
        """The legacy ``{token text: logprob}``: ids that decode alike keep the likeliest one's logprob."""
        top: dict[str, float] = {}
        for i, v in zip(ids[: self.top], vals[: self.top], strict=True):
            top.setdefault(self._token(i), v)
        return top

    @staticmethod
    def _merge_logprobs(into: dict | None, more: dict | None) -> dict | None:
        if into is None or more is None:
            return more or into
        for key, value in more.items():
            if isinstance(value, list):
                into[key] = into[key] + value
        return into

    def _choice(self, index: int, text: str, logprobs, finish, token_ids, delta: bool) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": index, ("delta" if delta else "message"): message}
        else:
            choice = {"index": index, "text": text}
        choice.update(logprobs=logprobs, finish_reason=finish)
        if self.body.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def _envelope(self, choices: list[dict], stream: bool) -> dict:
        obj = self.kind + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def respond(self, handle, events: asyncio.Queue):
        if self.body.stream:
            return StreamingResponse(self._stream(handle, events), media_type="text/event-stream")
        n = handle.n
        texts, ids, logprobs, finish = [""] * n, [[] for _ in range(n)], [None] * n, [None] * n
        open_ = n
        while open_:
            event = await events.get()
            i = event.choice
            logprobs[i] = self._merge_logprobs(logprobs[i], self._logprobs(event, len(texts[i])))
            texts[i] += event.text
            ids[i] += event.tokens
            if event.finish_reason is not None:
                finish[i], open_ = event.finish_reason, open_ - 1
        choices = [self._choice(i, texts[i], logprobs[i], finish[i], ids[i], delta=False) for i in range(n)]
        response = self._envelope(choices, stream=False)
        response["usage"] = self._usage(handle.prompt_tokens, sum(map(len, ids)))
        return JSONResponse(response)

    async def _stream(self, handle, events: asyncio.Queue) -> AsyncIterator[str]:
        n, open_, generated = handle.n, handle.n, 0
        sent = [0] * n
        try:
            if self.chat:  # the first chunk of each choice names the role, as OpenAI's stream does
                for i in range(n):
                    first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}  # fmt: skip
                    yield _sse(self._envelope([first], stream=True))
            while open_:
                event = await events.get()
                i = event.choice
                generated += len(event.tokens)
                choice = self._choice(
                    i, event.text, self._logprobs(event, sent[i]), event.finish_reason, event.tokens, delta=True
                )
                if self.chat:
                    del choice["delta"]["role"]
                sent[i] += len(event.text)
                open_ -= event.finish_reason is not None
                yield _sse(self._envelope([choice], stream=True))
            if (self.body.stream_options or {}).get("include_usage"):
                last = self._envelope([], stream=True)
                last["usage"] = self._usage(handle.prompt_tokens, generated)
                yield _sse(last)
            yield "data: [DONE]\n\n"
        finally:
            if open_:
                handle.cancel()  # the client went away: free the slots


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
