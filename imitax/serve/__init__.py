"""Serve an imitax model behind an OpenAI-compatible API: continuous batching over the KV cache.

>>> from imitax.serve import serving
>>> with serving("workdir") as base_url:                     # "http://127.0.0.1:PORT/v1"
...     openai.OpenAI(base_url=base_url, api_key="-").chat.completions.create(...)

:mod:`imitax.serve.engine` batches requests into cache slots; :mod:`imitax.serve.api` is the
HTTP layer (FastAPI); ``scripts/serve.py`` runs it from the command line.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import threading
from collections.abc import Iterator

import jax
import uvicorn

from imitax.serve.api import MAX_BODY_BYTES, create_app
from imitax.serve.engine import Engine, EngineError, SamplingParams

__all__ = ["MAX_BODY_BYTES", "Engine", "EngineError", "SamplingParams", "create_app", "load_app", "serving"]

log = logging.getLogger(__name__)


def load_app(
    model_path: str | pathlib.Path,
    *,
    template: str | None = None,
    max_batch: int = 16,
    max_len: int = 2048,
    api_key: str | None = None,
    model_name: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    **engine_kwargs,
):
    """Loads a model (anything :meth:`imitax.eval.lm.LM.from_path` reads), compiles its engine and builds the app.

    The app starts the engine's thread when it starts and, when it shuts down, finishes the
    requests in flight before the thread stops. Served name: ``model_name``, default the
    directory's basename.
    """
    from imitax.eval.lm import LM

    path = pathlib.Path(model_path).expanduser()
    lm = LM.from_path(path, mesh=mesh)
    engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_len=max_len, **engine_kwargs)
    name = model_name or path.resolve().name
    app = create_app(engine, name, template=template, api_key=api_key)
    engine.warmup()
    log.info("compiled %d programs: %s", len(engine.programs), ", ".join(engine.programs))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            engine.stop(drain=True)

    app.router.lifespan_context = lifespan
    return app


@contextlib.contextmanager
def serving(
    model_path: str | pathlib.Path,
    template: str | None = None,
    max_batch: int = 16,
    max_len: int = 2048,
    api_key: str | None = None,
    *,
    model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    **engine_kwargs,
) -> Iterator[str]:
    """Serves a model from a thread of this process; yields its base URL, ``http://HOST:PORT/v1``.

    ``port=0`` picks a free port. On exit the server stops taking connections, finishes the
    requests in flight and joins its thread.
    """
    app = load_app(
        model_path, template=template, max_batch=max_batch, max_len=max_len, api_key=api_key,
        model_name=model_name, **engine_kwargs,
    )  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="imitax-serve", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        thread.join(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join()
