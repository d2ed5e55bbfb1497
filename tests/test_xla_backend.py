"""imitax.xla_backend and the scripts' --xla_backend: which library XLA's CPU dots really run with.

What reaches XLA is read back from compiled HLO in fresh processes: YNNPACK and oneDNN
dots are fusions of kind ``__ynn_fusion`` / ``__onednn_fusion``; Eigen's are plain ``dot``s.
"""

import logging
import os
import pathlib
import platform
import subprocess
import sys
import textwrap

import pytest

from imitax import xla_backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "evaluate", "sweep", "convert")
ONEDNN_HERE = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")

# Prints the dot library of a compiled 64x64 matmul: a fusion kind, or 'dot' for a plain HLO dot.
_PROBE = """
import jax, jax.numpy as jnp
def dot_kind(**options):
    a = jnp.ones((64, 64), jnp.float32)
    hlo = jax.jit(jnp.dot, compiler_options=options or None).lower(a, a).compile().as_text()
    for kind in ("__onednn_fusion", "__ynn_fusion"):
        if f'"kind":"{kind}"' in hlo:
            return kind
    assert " dot(" in hlo, hlo
    return "dot"
"""

EXPECTED_KIND = {"ynn": "__ynn_fusion", "eigen": "dot", "onednn": "__onednn_fusion", "default": "__ynn_fusion"}


def clean_env(**extra) -> dict[str, str]:
    """This process's environment without the XLA settings conftest.py and configure() put there."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_backend.MARKER)}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def run_python(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


# -- configure(): the decision, on a given environment ---------------------------------------------


def test_sets_the_flags_and_a_marker_on_a_clean_cpu_environment():
    environ = {"JAX_PLATFORMS": "cpu"}
    assert xla_backend.configure("eigen", environ=environ) == "eigen"
    assert environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    assert environ[xla_backend.MARKER] == "eigen"


def test_flags_spell_the_compile_options():
    flags = xla_backend.xla_flags("onednn").split()
    assert flags == [
        "--xla_cpu_experimental_ynn_fusion_type=",
        "--xla_cpu_use_onednn=true",
        "--xla_cpu_experimental_onednn_fusion_type=individual_dot",
    ]
    assert xla_backend.xla_flags("ynn") == xla_backend.xla_flags("default") == ""


def test_user_flags_are_left_alone_and_it_says_so(caplog):
    environ = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    with caplog.at_level(logging.INFO, logger="imitax.xla_backend"):
        assert xla_backend.configure("eigen", environ=environ) == "default"
    assert environ == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert "XLA_FLAGS is set" in caplog.text and "unset XLA_FLAGS" in caplog.text


def test_a_parents_choice_is_replaced_not_taken_for_the_users():
    environ = {"JAX_PLATFORMS": "cpu"}
    xla_backend.configure("onednn", environ=environ)  # a parent process
    child = dict(environ)
    assert xla_backend.configure("eigen", environ=child) == "eigen"
    assert child["XLA_FLAGS"] == xla_backend.xla_flags("eigen")
    child = dict(environ)
    assert xla_backend.configure("default", environ=child) == "default"
    assert "XLA_FLAGS" not in child and xla_backend.MARKER not in child


def test_edited_flags_with_our_marker_count_as_the_users():
    environ = {"JAX_PLATFORMS": "cpu", xla_backend.MARKER: "onednn"}
    environ["XLA_FLAGS"] = xla_backend.xla_flags("onednn") + " --xla_dump_to=/tmp/d"
    assert xla_backend.configure("eigen", environ=environ) == "default"
    assert environ["XLA_FLAGS"].endswith("--xla_dump_to=/tmp/d")


def _fake_cuda_plugin(tmp_path, monkeypatch):
    # A jax_plugins namespace module, as jax-cuda12-plugin installs: JAX would try it first.
    (tmp_path / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_cuda12" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_accelerator_platform_leaves_the_flags_or_refuses_an_explicit_request(caplog, tmp_path, monkeypatch):
    _fake_cuda_plugin(tmp_path, monkeypatch)
    environ = {"JAX_PLATFORMS": "cuda"}
    with caplog.at_level(logging.INFO, logger="imitax.xla_backend"):
        assert xla_backend.configure("onednn", explicit=False, environ=environ) == "default"
    assert "XLA_FLAGS" not in environ
    assert "JAX_PLATFORMS=cuda" in caplog.text
    with pytest.raises(xla_backend.BackendError, match="set JAX_PLATFORMS=cpu"):
        xla_backend.configure("onednn", explicit=True, environ=environ)
    assert xla_backend.configure("default", explicit=True, environ=environ) == "default"


def test_an_installed_accelerator_plugin_leaves_the_default_unapplied(tmp_path, monkeypatch):
    _fake_cuda_plugin(tmp_path, monkeypatch)
    environ = {}
    assert xla_backend.configure("onednn", explicit=False, environ=environ) == "default"
    assert "XLA_FLAGS" not in environ
    environ = {"JAX_PLATFORMS": "cpu"}  # the user's way to the CPU, and to the flag
    assert xla_backend.configure("eigen", explicit=False, environ=environ) == "eigen"


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(xla_backend.BackendError, match="use one of default, ynn, eigen, onednn"):
        xla_backend.configure("mkl", environ={"JAX_PLATFORMS": "cpu"})


def test_onednn_off_linux_x86_refuses_when_asked_and_falls_back_by_default(monkeypatch):
    with pytest.raises(xla_backend.BackendError, match="Linux x86-64 only, this is Linux aarch64"):
        xla_backend.check("onednn", system="Linux", machine="aarch64")
    xla_backend.check("ynn", system="Darwin", machine="arm64")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    environ = {"JAX_PLATFORMS": "cpu"}
    assert xla_backend.configure("onednn", explicit=False, environ=environ) == "default"
    assert "XLA_FLAGS" not in environ
    with pytest.raises(xla_backend.BackendError, match="use --xla_backend=ynn"):
        xla_backend.configure("onednn", explicit=True, environ=environ)


def test_too_late_once_jax_has_started(monkeypatch):
    import jax

    jax.devices()  # this test process's backends exist now: XLA_FLAGS would be read no more
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # as if the user had set none
    monkeypatch.delenv(xla_backend.MARKER, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    with pytest.raises(RuntimeError, match="after JAX initialized"):
        xla_backend.configure("eigen")  # this process's own environment
    assert "XLA_FLAGS" not in os.environ
    # A mapping for a child process may still be prepared: the child's JAX has not started.
    child = {"JAX_PLATFORMS": "cpu"}
    assert xla_backend.configure("eigen", environ=child) == "eigen" and child["XLA_FLAGS"]


# -- what reaches XLA, in fresh processes -----------------------------------------------------------


@pytest.mark.parametrize("backend", ["ynn", "eigen", "onednn", "default"])
def test_define_flag_reaches_xla_and_matches_the_compile_options(backend):
    if backend == "onednn" and not ONEDNN_HERE:
        pytest.skip("jaxlib has oneDNN on Linux x86-64 only")
    code = _PROBE + textwrap.dedent(
        """
        import os, sys
        from absl import app
        from imitax import xla_backend
        xla_backend.define_flag()
        def main(argv):
            print(os.environ.get("XLA_FLAGS", ""))
            print(dot_kind())
            name = sys.argv[1].split("=")[1]
            print(dot_kind(**xla_backend.COMPILE_OPTIONS.get(name, {})))
        app.run(main)
        """
    )
    out = run_python(code, clean_env(), f"--xla_backend={backend}")
    assert out.returncode == 0, out.stderr
    flags, from_env, from_options = out.stdout.splitlines()
    assert flags == xla_backend.xla_flags(backend)
    assert from_env == from_options == EXPECTED_KIND[backend]


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_sets_the_flags_before_jax_starts(script):
    """The script's module-level code and flag parsing, then a compile: its dots are the flag's."""
    backend = "onednn" if ONEDNN_HERE else "eigen"
    code = _PROBE + textwrap.dedent(
        f"""
        import runpy, sys
        from absl import flags
        runpy.run_path("scripts/{script}.py", run_name="not_main")  # flags defined, main not run
        flags.FLAGS(["{script}.py", *sys.argv[1:]])
        print(dot_kind())
        """
    )
    workdir = ["--workdir=/nonexistent"] if script in ("train", "sweep") else []
    out = run_python(code, clean_env(), f"--xla_backend={backend}", *workdir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [EXPECTED_KIND[backend]]
    # Unset, the flag is the module's default.
    out = run_python(code, clean_env(), *workdir)
    assert out.returncode == 0, out.stderr
    default = xla_backend.TRAIN_DEFAULT if script == "train" else xla_backend.DEFAULT
    if default == "onednn" and not ONEDNN_HERE:
        default = "default"  # a default that cannot run here falls back to XLA's own
    assert out.stdout.split() == [EXPECTED_KIND[default]]


def test_user_flags_win_in_a_script():
    code = _PROBE + textwrap.dedent(
        """
        import runpy, sys
        from absl import flags
        runpy.run_path("scripts/train.py", run_name="not_main")
        flags.FLAGS(["train.py", "--xla_backend=eigen", "--workdir=/nonexistent"])
        print(dot_kind())
        """
    )
    out = run_python(code, clean_env(XLA_FLAGS="--xla_cpu_use_onednn=false"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["__ynn_fusion"]  # XLA's default: the user's XLA_FLAGS, not --xla_backend


# -- bad input: one line on stderr, exit status 1 ----------------------------------------------------


def run_script(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    workdir = ["--workdir=/nonexistent"] if script in ("train", "sweep") else []
    return subprocess.run(
        [sys.executable, f"scripts/{script}.py", *workdir, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_backend_is_one_line_and_status_1(script):
    out = run_script(script, "--xla_backend=mkl", env=clean_env())
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "error: --xla_backend=mkl is not a backend: use one of default, ynn, eigen, onednn"
    ]


def test_cpu_backend_on_an_accelerator_platform_is_one_line_and_status_1():
    out = run_script("evaluate", "--xla_backend=eigen", env=clean_env(JAX_PLATFORMS="tpu"))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "error: --xla_backend=eigen picks a CPU matmul library, but JAX_PLATFORMS=tpu runs JAX on an accelerator: "
        "drop --xla_backend, or set JAX_PLATFORMS=cpu"
    ]


def test_an_accelerator_platform_without_its_plugin_is_refused(tmp_path, monkeypatch):
    with pytest.raises(xla_backend.BackendError, match="JAX_PLATFORMS=cuda asks JAX for an NVIDIA GPU, but no JAX"):
        xla_backend.configure("default", explicit=False, environ={"JAX_PLATFORMS": "cuda"})
    _fake_cuda_plugin(tmp_path, monkeypatch)
    xla_backend.check_platform({"JAX_PLATFORMS": "cuda"})  # a plugin is there: JAX gets to try
    with pytest.raises(xla_backend.BackendError, match="asks JAX for a TPU"):
        xla_backend.check_platform({"JAX_PLATFORMS": "tpu,cpu"})
    xla_backend.check_platform({"JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("script", ["train", "evaluate"])
def test_a_gpu_asked_for_where_there_is_none_is_one_line_and_status_1(script):
    out = run_script(script, env=clean_env(JAX_PLATFORMS="cuda"))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "error: JAX_PLATFORMS=cuda asks JAX for an NVIDIA GPU, but no JAX plugin for one is installed here: on a "
        "machine with an NVIDIA GPU, install the gpu extra (pip install 'imitax[gpu]'); or unset JAX_PLATFORMS to "
        "run on the CPU"
    ]


def test_onednn_where_it_is_not_built_is_one_line_and_status_1(tmp_path):
    # An ARM machine, as far as Python can tell: platform.machine() answers aarch64 in the child.
    (tmp_path / "sitecustomize.py").write_text("import platform\nplatform.machine = lambda: 'aarch64'\n")
    env = clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    out = run_script("train", "--xla_backend=onednn", env=env)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"error: --xla_backend=onednn: jaxlib has oneDNN on Linux x86-64 only, this is {platform.system()} aarch64: "
        "use --xla_backend=ynn (or default)"
    ]
