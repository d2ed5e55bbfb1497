"""Which kernel library XLA's CPU backend runs matrix multiplications with, chosen before JAX starts.

jaxlib's CPU compiler can hand each dot to one of several libraries, and none
is fastest everywhere (``benchmarks/results/train_profile.md``): oneDNN ran
GPT-2-124M's forward pass 1.1-1.3x faster than YNNPACK, XLA's own choice, but
its few-row dots are 10-25x slower (greedy decoding: 0.46x), and it tied or
lost elsewhere. Every script defaults to XLA's own choice (see ``DEFAULT`` and
``TRAIN_DEFAULT`` for the evidence); ``--xla_backend`` picks another. The
choice is an XLA debug option, read from the ``XLA_FLAGS`` environment
variable once, when JAX creates its CPU client; so it has to be made before
anything touches a JAX backend. Scripts
take it as a flag, processed while absl parses the command line (before
``main`` runs, and so before the scripts import imitax's JAX modules)::

    from imitax import xla_backend
    xla_backend.define_flag()                           # --xla_backend, default: XLA's own
    xla_backend.define_flag(xla_backend.TRAIN_DEFAULT)  # scripts/train.py's default

Libraries and programs that do not use absl call :func:`configure` instead.

Backends (jaxlib >= 0.10):

* ``ynn``: YNNPACK fusions of single dots, XLA's own default.
* ``eigen``: no library fusions; XLA's plain dots, run with Eigen.
* ``onednn``: Intel's oneDNN for single dots (Linux x86-64 builds of jaxlib).
* ``default``: leave ``XLA_FLAGS`` alone (XLA's own choice, today ``ynn``).

The flags are only ever set when the user has not set ``XLA_FLAGS``, and only
when JAX will run on the CPU: on a GPU or TPU these options do not apply.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import platform
import sys
from collections.abc import MutableMapping
from typing import Any

__all__ = [
    "BACKENDS",
    "COMPILE_OPTIONS",
    "DEFAULT",
    "TRAIN_DEFAULT",
    "BackendError",
    "check",
    "check_platform",
    "configure",
    "define_flag",
    "xla_flags",
]

logger = logging.getLogger(__name__)

# The per-compilation DebugOptions of each backend (jax.jit(..., compiler_options=...)). Clearing
# the YNN fusion list leaves plain HLO dots, which the runtime runs with Eigen ('eigen') or which
# the oneDNN fusion pass claims when it is switched on ('onednn').
COMPILE_OPTIONS: dict[str, dict[str, Any]] = {
    "ynn": {},
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "onednn": {
        "xla_cpu_experimental_ynn_fusion_type": "",
        "xla_cpu_use_onednn": True,
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    },
}
BACKENDS = ("default", *COMPILE_OPTIONS)

# Chosen by measurement (float32, jaxlib 0.10.2, a 2-core AMD EPYC with AVX-512, each backend timed
# round-robin in one run; figures and commands in benchmarks/results/train_profile.md). Against
# YNNPACK (XLA's own choice), oneDNN's dots: GPT-2-124M forward pass 1.1-1.3x; train step a wash
# (GPT-2 0.8x-1.5x across loaded runs, 1.17x in one idle run; LLaMA-1B widths 0.98x); LLaMA-1B
# forward pass 0.88x; scoring 0.94x; greedy decoding 0.46x (it repacks the weights on every call:
# 1 to 8 rows x 768 @ 768 x 50257 take 10-25x longer). Eigen's plain dots were never ahead overall.
# So XLA's own choice is the default, for training too (TRAIN_DEFAULT, scripts/train.py's): besides
# the measurements, jaxlib 0.10.2 with oneDNN aborted processes
# (`object_pool.h:117 Check failed: available_.size() == num_created_` in ~OneDnnFusionThunk, when
# a compiled program is freed: 7 times in one 48-cell demo sweep, 2 of 5 single-cell runs), and
# its programs cannot enter the persistent compilation cache ("ToProto is not implemented for
# thunk kind: onednn-fusion"), so every process recompiles. A default must not abort. Where
# oneDNN is not built in, configure() falls back to XLA's own choice for a default (an explicit
# request is an error).
DEFAULT = "default"
TRAIN_DEFAULT = DEFAULT

# Set beside XLA_FLAGS, so that a child process (a sweep's cell, a benchmark's worker) can tell
# flags this module wrote from flags a user wrote, and replace them with its own choice.
MARKER = "IMITAX_XLA_BACKEND"

# XLA_FLAGS spells the fusion-type enum by its short name.
_FLAG_SPELLING = {"LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT": "individual_dot", True: "true", False: "false"}


class BackendError(ValueError):
    """A backend that does not exist, or cannot run here; the message says what to do instead."""


def xla_flags(backend: str) -> str:
    """The ``XLA_FLAGS`` string that selects ``backend`` ('' for ``ynn`` and ``default``: XLA's own)."""
    if backend == "default":
        return ""
    check(backend)
    options = COMPILE_OPTIONS[backend]
    return " ".join(f"--{k}={_FLAG_SPELLING.get(v, v)}" for k, v in options.items())


def _onednn_built(system: str, machine: str) -> bool:
    # jaxlib links oneDNN into its Linux x86-64 wheels only; elsewhere the flag is accepted and
    # silently does nothing, which would leave the user on Eigen's slower dots.
    return system == "Linux" and machine.lower() in ("x86_64", "amd64")


def check(backend: str, *, system: str | None = None, machine: str | None = None) -> None:
    """Raises :class:`BackendError` unless ``backend`` exists and can run on this machine.

    Args:
      backend: one of :data:`BACKENDS`.
      system: ``platform.system()`` (for tests).
      machine: ``platform.machine()`` (for tests).
    """
    if backend not in BACKENDS:
        raise BackendError(f"--xla_backend={backend} is not a backend: use one of {', '.join(BACKENDS)}")
    system, machine = system or platform.system(), machine or platform.machine()
    if backend == "onednn" and not _onednn_built(system, machine):
        raise BackendError(
            f"--xla_backend=onednn: jaxlib has oneDNN on Linux x86-64 only, this is {system} {machine}: "
            "use --xla_backend=ynn (or default)"
        )


def _installed_plugins() -> list[str]:
    """The JAX accelerator plugins installed here, by name (``xla_cuda12``, ``libtpu``, ...)."""
    # JAX finds plugins both ways: modules of the jax_plugins namespace package, and entry points.
    plugins = []
    try:
        spec = importlib.util.find_spec("jax_plugins")
        if spec is not None and spec.submodule_search_locations:
            plugins += sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))
        plugins += sorted(ep.name for ep in importlib.metadata.entry_points(group="jax_plugins"))
    except Exception:  # a broken distribution's metadata must not stop a CPU run
        pass
    if importlib.util.find_spec("libtpu") is not None:
        plugins.append("libtpu")
    return plugins


def _accelerator(environ: MutableMapping[str, str]) -> tuple[str | None, bool]:
    """The accelerator JAX would use instead of the CPU, as far as can be told without starting it.

    Returns:
      ``(what, certain)``: ``what`` names the accelerator (None: the CPU). ``JAX_PLATFORMS``
      decides when set (its first entry is JAX's default backend): certain. Unset, JAX prefers
      any GPU or TPU plugin that finds a device, which cannot be known without initializing it,
      so an installed plugin counts as an accelerator, uncertainly.
    """
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        first = platforms.split(",")[0].strip().lower()
        return (None if first == "cpu" else f"JAX_PLATFORMS={platforms}"), True
    plugins = _installed_plugins()
    return (f"the installed JAX plugin {plugins[0]}" if plugins else None), False


# JAX_PLATFORMS names of accelerators -> what their plugin's name contains, and how to get it.
_PLATFORM_PLUGINS = {
    "cuda": (("cuda",), "an NVIDIA GPU", "install the gpu extra (pip install 'imitax[gpu]')"),
    "gpu": (("cuda", "rocm"), "a GPU", "install the gpu extra (pip install 'imitax[gpu]')"),
    "rocm": (("rocm",), "an AMD GPU", "install JAX's ROCm plugin"),
    "tpu": (("tpu",), "a TPU", "install jax[tpu]"),
}


def check_platform(environ: MutableMapping[str, str] | None = None) -> None:
    """Raises :class:`BackendError` when ``JAX_PLATFORMS`` asks for an accelerator whose JAX plugin is not installed.

    JAX itself fails only when a program first touches a device, deep inside the run and with
    a traceback; this says it at start-up, in one line, without starting JAX.
    """
    environ = os.environ if environ is None else environ
    platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if not platforms or platforms[0] not in _PLATFORM_PLUGINS:
        return
    needles, what, remedy = _PLATFORM_PLUGINS[platforms[0]]
    if not any(n in plugin.lower() for plugin in _installed_plugins() for n in needles):
        raise BackendError(
            f"JAX_PLATFORMS={environ['JAX_PLATFORMS']} asks JAX for {what}, but no JAX plugin for one is "
            f"installed here: on a machine with {what}, {remedy}; or unset JAX_PLATFORMS to run on the CPU"
        )


def _backends_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(bridge is not None and getattr(bridge, "_backends", None))


def configure(backend: str = DEFAULT, *, explicit: bool = True, environ: MutableMapping[str, str] | None = None) -> str:
    """Selects XLA's CPU dot library by setting ``XLA_FLAGS``, unless the user set them or JAX will not use the CPU.

    Call before anything initializes a JAX backend (``jax.devices()``, the first array or
    computation); importing ``jax`` is fine. What was decided is logged at INFO.

    Args:
      backend: one of :data:`BACKENDS`.
      explicit: whether the user asked for ``backend`` (a flag given on the command line).
        A default that cannot run here (oneDNN on an ARM machine) falls back to XLA's own
        choice at INFO; an explicit request raises instead.
      environ: the environment to read and change (default: ``os.environ``).

    Returns:
      The backend in effect: ``backend``, or ``'default'`` when XLA's own choice was left
      (flags set by the user, an accelerator platform, or ``backend='default'``).

    Raises:
      BackendError: an unknown backend; an explicitly requested one that cannot run here
        (oneDNN off Linux x86-64, or a CPU library while ``JAX_PLATFORMS`` names an accelerator).
      RuntimeError: JAX's backends were initialized already, so ``XLA_FLAGS`` would be ignored.
    """
    effective, message = _configure(backend, explicit, os.environ if environ is None else environ)
    logger.info("%s", message)
    return effective


def _configure(backend: str, explicit: bool, environ: MutableMapping[str, str]) -> tuple[str, str]:
    """:func:`configure` without the logging: ``(backend in effect, what happened)``."""
    if backend not in BACKENDS:
        check(backend)  # raises, naming the backends
    accelerator, certain = _accelerator(environ)
    if backend != "default" and accelerator is not None and explicit and certain:
        raise BackendError(
            f"--xla_backend={backend} picks a CPU matmul library, but {accelerator} runs JAX on an "
            "accelerator: drop --xla_backend, or set JAX_PLATFORMS=cpu"
        )
    check_platform(environ)
    ours = environ.get(MARKER)
    user_flags = environ.get("XLA_FLAGS", "")
    if ours in COMPILE_OPTIONS and user_flags == xla_flags(ours):
        if ours == backend:  # already in effect (flags parsed twice, or the same choice as a parent's)
            return backend, f"XLA CPU dots: {backend} (XLA_FLAGS={user_flags!r})"
        user_flags = ""  # written by configure() in a parent process: ours to replace
    if user_flags.strip():
        return "default", (
            f"XLA_FLAGS is set ({user_flags!r}): left as it is, so --xla_backend={backend} does not apply "
            "(unset XLA_FLAGS to use it)"
        )
    note = ""
    if backend != "default" and accelerator is not None:
        note = (
            f"JAX will run on {accelerator}: --xla_backend={backend} left unapplied "
            "(set JAX_PLATFORMS=cpu to run on the CPU with it)"
        )
        backend = "default"
    if backend != "default":
        try:
            check(backend)
        except BackendError as e:
            if explicit:
                raise
            note, backend = f"{e}; XLA's own dot library is used instead", "default"
    if backend == "default":
        if ours:  # a parent process's choice, not this one's
            environ.pop("XLA_FLAGS", None)
            environ.pop(MARKER, None)
        return "default", note or "XLA CPU dots: XLA's own choice (--xla_backend=default)"
    # Only this process's own environment is read by its backends; a mapping meant for a child
    # process (a sweep's cell, a benchmark's worker) may be prepared at any time.
    if environ is os.environ and _backends_started():
        raise RuntimeError(
            f"xla_backend.configure({backend!r}) was called after JAX initialized its backends, so XLA_FLAGS "
            "would be ignored: call it before the first jax.devices() or computation"
        )
    environ["XLA_FLAGS"] = xla_flags(backend)
    environ[MARKER] = backend
    return backend, f"XLA CPU dots: {backend} (XLA_FLAGS={environ['XLA_FLAGS']!r})"


def define_flag(default: str = DEFAULT, flag_values=None):
    """Defines ``--xla_backend`` and applies it as soon as absl has parsed the command line.

    The flag is applied by an absl validator, which runs inside ``FLAGS(argv)``: before
    ``app.run`` calls ``main``, so before a script's ``main`` imports anything that starts
    JAX. A bad value prints one line to stderr and exits with status 1.

    Args:
      default: the backend used when the flag is not given.
      flag_values: the absl ``FlagValues`` to define it in (default: ``absl.flags.FLAGS``).

    Returns:
      The flag's ``FlagHolder``.
    """
    from absl import app, flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    holder = flags.DEFINE_string(
        "xla_backend",
        default,
        f"XLA's CPU matmul library, one of {'|'.join(BACKENDS)} ('default': XLA's own). Ignored when XLA_FLAGS "
        "is set or JAX runs on a GPU/TPU.",
        flag_values=flag_values,
    )

    def apply(value: str) -> bool:
        try:
            _, message = _configure(value, flag_values["xla_backend"].present > 0, os.environ)
        except BackendError as e:
            sys.exit(f"error: {e}")
        # Validators run inside flag parsing, before absl lets INFO records through: log once it has.
        app.call_after_init(functools.partial(logger.info, "%s", message))
        return True

    flags.register_validator("xla_backend", apply, flag_values=flag_values)
    return holder
