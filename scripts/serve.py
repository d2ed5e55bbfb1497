r"""Serves a model behind an OpenAI-compatible API (chat, completions, streaming) until SIGTERM or Ctrl-C.

  python scripts/serve.py --model=PATH [--host=127.0.0.1] [--port=8000] [--template=koala|vicuna|chatml|chat_template]
      [--max_batch=16] [--max_len=2048] [--mesh=data=-1] [--api_key_env=VAR] [--model_name=NAME]

PATH is what scripts/evaluate.py accepts: an imitax checkpoint, a training workdir (its newest
checkpoint) or a Hugging Face model directory. The model is served as NAME (default: PATH's
basename) at http://HOST:PORT/v1, on loopback unless --host says otherwise. With
--api_key_env=VAR every /v1 request needs ``Authorization: Bearer $VAR`` (the key is read from
the environment and never logged). SIGTERM stops taking requests, finishes those in flight, then
exits. Bad input (no such model, a missing key variable) is one line on stderr and exit status 1.
See docs/serving.md.
"""

import os
import socket
import sys

# imitax needs no torch at run time; transformers imports it whenever it is installed (see scripts/convert.py).
sys.modules.setdefault("torch", None)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import app, flags, logging  # noqa: E402

from imitax import allocator, cli, xla_backend  # noqa: E402

xla_backend.define_flag()  # --xla_backend, applied as flags are parsed: before main() imports JAX
allocator.keep_freed_memory()  # freed XLA temporaries stay for the next step (imitax/allocator.py)
_MODEL = flags.DEFINE_string("model", None, "imitax checkpoint, training workdir or Hugging Face model directory.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port, printed at start).")
_TEMPLATE = flags.DEFINE_enum(
    "template",
    None,
    ["koala", "vicuna", "chatml", "chat_template"],
    "How chat messages become a prompt, as in training (default: the tokenizer's chat template, else koala).",
)
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Cache slots: choices decoded at once.")
_MAX_LEN = flags.DEFINE_integer(
    "max_len", 2048, "Longest prompt plus output (capped at a learned-position model's positions)."
)
_CHUNK = flags.DEFINE_integer("chunk", 128, "Prompt tokens per slot and prefill step.")
_MAX_WAITING = flags.DEFINE_integer(
    "max_waiting", None, "Choices that may wait for a slot; more get HTTP 429 (default: 4 x --max_batch)."
)
_MESH = flags.DEFINE_string("mesh", "", "Device mesh, e.g. 'data=-1' (default: one device).")
_API_KEY_ENV = flags.DEFINE_string("api_key_env", None, "Environment variable holding the API key clients must send.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Name clients ask for (default: the model directory's basename).")


def _fail(message: str) -> None:
    print(f"serve.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _MODEL.value:
        _fail("--model=PATH is required; see --help")
    api_key = None
    if _API_KEY_ENV.value:
        api_key = os.environ.get(_API_KEY_ENV.value)
        if not api_key:
            _fail(f"--api_key_env={_API_KEY_ENV.value}: that environment variable is not set or empty; export it")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import uvicorn

    from imitax import sharding
    from imitax.convert import ConversionError
    from imitax.serve import load_app

    try:
        mesh = sharding.make_mesh(_MESH.value) if _MESH.value else None
        server_app = load_app(
            _MODEL.value,
            template=_TEMPLATE.value,
            max_batch=_MAX_BATCH.value,
            max_len=_MAX_LEN.value,
            api_key=api_key,
            model_name=_MODEL_NAME.value,
            mesh=mesh,
            chunk=_CHUNK.value,
            max_waiting=_MAX_WAITING.value,
        )
    except (ValueError, FileNotFoundError, ConversionError) as e:
        _fail(str(e))
    family = socket.AF_INET6 if ":" in _HOST.value else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((_HOST.value, _PORT.value))  # bound here so that --port=0 can print the port it got
    except OSError as e:
        _fail(f"cannot listen on {_HOST.value}:{_PORT.value}: {e.strerror}; pick another --port or --host")
    sock.listen(2048)  # connections queue from now on, so the line below means "ready"
    port = sock.getsockname()[1]
    print(f"serving {server_app.state.model_name!r} on http://{_HOST.value}:{port}/v1", flush=True)
    # uvicorn handles SIGTERM and SIGINT: it stops accepting, waits for the requests in flight, then
    # the app's shutdown drains the engine.
    uvicorn.Server(uvicorn.Config(server_app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
