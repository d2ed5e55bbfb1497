"""The docs name only what exists, and the README's Python examples run.

README.md, benchmarks/README.md, docs/design.md and docs/study.md are parsed: their fenced
``bash`` blocks and their inline `code` spans. What they name is checked against the code itself,
not against a list kept here:

- every repository path (``scripts/...``, ``configs/...``, ``tests/data/...``, ``docs/...``, ...;
  in benchmarks/README.md also its own ``results/`` and bare ``*_benchmark.py`` names; in a table
  row whose first cell is a path, the row's bare file names as that directory's) exists, and
  every markdown link target and ``#anchor`` resolves;
- every ``--flag`` after a script is a flag that script defines: each script is executed once,
  with ``absl.app.run`` made a no-op, in one subprocess, and the absl flags it defined are read;
- every ``--config.a.b`` override is a key of the config the command loads (its ``--config=FILE:ARG``
  or the script's default config file), loaded through ml_collections' own config-file parser;
- every ``configs/X.py:ARG`` loads (the configs refuse arguments they do not know);
- inline flags written on their own (`--num_fewshot`, `--config.seq_len`) belong to a script, or
  a config, that a command of the same ``##`` section runs (in a section that runs none, one
  that the docs run somewhere);
- fully qualified ``imitax.a.b`` names resolve;
- ``pip install '.[EXTRA]'`` names an extra of pyproject.toml.

The placeholder rule: a path component or config-key component written in capitals (``DIR``,
``CKPT``, ``HF_DIR``, ``NAME.py``, ``FIELD``), in angle brackets (``<step>``) or as ``...``
stands for the reader's own value (so does such a value in ``configs/X.py:model=...``): it and
what follows it are not checked, but what precedes it must exist (so ``configs/sweeps/NAME.py``
still needs ``configs/sweeps/``). Absolute paths, URLs and paths
outside the repository's own directories (``/weights/...``, ``gs://...``, ``out/demo``) are the
reader's and are not checked.

The README's ```python blocks run on a tiny model, with its paths replaced by a checkpoint and
directories made here (:data:`EXAMPLE_PATHS`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import json
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import train_helpers as th
from ml_collections.config_flags import config_flags

ROOT = th.ROOT
DOCS = (
    "README.md",
    "benchmarks/README.md",
    "docs/design.md",
    "docs/study.md",
    "docs/collecting.md",
    "docs/judging.md",
    "docs/rating.md",
    "docs/launch.md",
    "docs/serving.md",
    "docs/distillation.md",
    "docs/demo_distill_results.md",
)
# The repository's own top-level directories: a path starting with one of them must exist.
REPO_DIRS = ("scripts", "benchmarks", "configs", "tests", "docs", "imitax", ".ci")
SCRIPT_DIRS = ("scripts", "benchmarks")
SHELL_OPERATORS = {"&&", "||", ";", "|"}
# The paths of the README's Python examples, and what the test puts in their place.
EXAMPLE_PATHS = ("/tmp/my_run_eval", "/tmp/my_run", "/tmp/run_eval", "/tmp/run", "path/to/hf_dir")


# -- parsing ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Command:
    """A script invocation named by a doc: ``script`` (a repo path or ``-m module``) and its arguments."""

    script: str
    args: list[str]
    where: str


@dataclasses.dataclass
class Section:
    """One ``##`` section of a doc: its commands, the scripts it names, its flag-only spans."""

    title: str
    commands: list[Command] = dataclasses.field(default_factory=list)
    scripts: set[str] = dataclasses.field(default_factory=set)
    flag_spans: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (span, where)
    words: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # other tokens, (token, where)


def is_placeholder(part: str) -> bool:
    """``DIR``, ``HF_DIR``, ``NAME.py``, ``<step>``, ``...``: the reader's value, not a name to check."""
    stem = part.split(".")[0]
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", stem)) or "<" in part or part.strip(".") == ""


def _strip(token: str) -> str:
    """A token without the optional-argument brackets, quotes and trailing prose punctuation."""
    return token.strip("[]'\"").rstrip(",;:)")


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _repo_module(script: str) -> bool:
    """Whether ``'-m a.b'`` names a module file of the repository."""
    return script.startswith("-m ") and (ROOT / (script[3:].replace(".", "/") + ".py")).is_file()


def script_of(token: str, doc_dir: pathlib.Path) -> str | None:
    """The repo-relative script a command token runs (``scripts/x.py``, or ``x_benchmark.py`` beside the doc)."""
    token = _strip(token)
    if token.startswith("-") or not token.endswith(".py") or "=" in token:
        return None
    path = (doc_dir / token) if "/" not in token else ROOT / token
    if not path.is_file() and (ROOT / token).is_file():
        path = ROOT / token
    rel = path.resolve().relative_to(ROOT.resolve()) if path.resolve().is_relative_to(ROOT.resolve()) else None
    if rel is None or rel.parts[0] not in SCRIPT_DIRS:
        return None
    return rel.as_posix()


def _row_base(prose: str, offset: int) -> str | None:
    """In a table row whose first cell is a path (`imitax/data/`, `imitax/models/gpt2.py`), its directory.

    Layout tables name files relative to the row's directory (`| imitax/data/ | formats.py ... |`);
    those names are checked as that directory's.
    """
    line = prose[prose.rfind("\n", 0, offset) + 1 : prose.find("\n", offset)]
    first = re.match(r"\s*\|\s*`([^`]+)`", line)
    if not first or first.group(1).startswith("-") or "/" not in first.group(1):
        return None
    path = first.group(1).split()[0].rstrip(",")
    return path if path.endswith("/") else path.rsplit("/", 1)[0] + "/"


def _in_row(word: str, base: str | None) -> str:
    """``word`` as a path of the row's directory, when it is a relative file or directory name."""
    name = _strip(word)
    if base is None or name.startswith(("-", "/", ".")) or name.split("/")[0] in REPO_DIRS:
        return word
    if name.endswith(".py") or (name.endswith("/") and re.fullmatch(r"[\w/]+", name)):
        return base + name
    return word


def parse_command_line(line: str, doc_dir: pathlib.Path, where: str) -> tuple[list[Command], list[str]]:
    """The script invocations of one shell line, and its other words (launchers, paths)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as e:
        raise AssertionError(f"{where}: cannot split {line!r} as a shell line: {e}") from None
    commands, words, segment = [], [], []
    for token in [*tokens, ";"]:
        if token not in SHELL_OPERATORS:
            segment.append(token)
            continue
        script, args = None, []
        for i, tok in enumerate(segment):
            if " " in tok:  # a quoted command (ssh --command='...'): parse it too
                inner, inner_words = parse_command_line(tok, doc_dir, where)
                commands += inner
                words += inner_words
            elif tok == "-m" and i + 1 < len(segment):
                if segment[i + 1].split(".")[0] in REPO_DIRS:  # not python -m pytest, venv, ...
                    script, args = f"-m {segment[i + 1]}", segment[i + 2 :]
                break
            elif (found := script_of(tok, doc_dir)) is not None or (
                _strip(tok).endswith(".py") and not tok.startswith("-") and "=" not in tok and i > 0
            ):
                # A .py file that is not an existing script is still the command's script: the
                # path check reports it.
                script, args = found or _strip(tok), segment[i + 1 :]
                break
            else:
                words.append(tok)
        if script is not None:
            commands.append(Command(script, args, where))
        segment = []
    return commands, words


def parse_doc(path: pathlib.Path) -> tuple[str, list[Section], list[tuple[str, str]], list[str]]:
    """``(text, sections, links, python_blocks)`` of a doc; links are ``(target, where)``."""
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    text = path.read_text()
    doc_dir = path.parent
    sections: list[Section] = []
    python_blocks: list[str] = []
    links = [(m.group(1), f"{rel}:{_line_of(text, m.start())}") for m in re.finditer(r"\]\(([^)\s]+)\)", text)]

    # Split at '## ' headings outside fenced blocks (a shell comment may start with '## ').
    fences = [m.span() for m in re.finditer(r"^```.*?^```", text, re.S | re.M)]
    starts = [m.start() for m in re.finditer(r"^## ", text, re.M) if not any(a < m.start() < b for a, b in fences)]
    bounds = list(zip([0, *starts], [*starts, len(text)], strict=True))
    for begin, end in bounds:
        body = text[begin:end]
        title = body.splitlines()[0].lstrip("# ") if body.startswith("## ") else "(top)"
        section = Section(title)
        sections.append(section)

        def block(match, begin=begin, section=section):
            lang, code = match.group(1), match.group(2)
            line0 = _line_of(text, begin + match.start()) + 1
            if lang == "python":
                python_blocks.append(code)
            elif lang == "bash":
                # Join continuation lines, keeping the number of each command's first line.
                logical, start = "", None
                for n, raw in enumerate(code.splitlines()):
                    start = line0 + n if start is None else start
                    if raw.rstrip().endswith("\\"):
                        logical += raw.rstrip()[:-1] + " "
                        continue
                    logical += raw
                    cmds, words = parse_command_line(logical, doc_dir, f"{rel}:{start}")
                    section.commands += cmds
                    section.words += [(w, f"{rel}:{start}") for w in words]
                    logical, start = "", None
            return "\n" * match.group(0).count("\n")  # keep line numbers for the spans below

        prose = re.sub(r"^```(\w*)\n(.*?)^```", block, body, flags=re.S | re.M)
        for m in re.finditer(r"`([^`]+)`", prose):
            span, where = " ".join(m.group(1).split()), f"{rel}:{_line_of(text, begin + m.start())}"
            cmds, words = parse_command_line(span, doc_dir, where)
            if cmds:
                section.commands += cmds
            elif span.startswith("--"):
                section.flag_spans.append((span, where))
                continue
            base = _row_base(prose, m.start())
            section.words += [(_in_row(w, base), where) for w in words]
        section.scripts = {c.script for c in section.commands}
    return text, sections, links, python_blocks


# -- what the code defines ----------------------------------------------------------------------------

# Runs each script's module code with absl.app.run disabled (so main never starts) and prints the
# flags each one defined. Libraries that define flags of their own on import (Orbax) are imported
# first, so theirs count as absl's built-in ones, accepted by every script. torch too: the scripts
# that do not need it hide it (sys.modules["torch"] = None, if not imported yet), and the benchmarks
# that come after them import it.
_FLAG_DUMP = r"""
import json, runpy, sys
import jax, orbax.checkpoint, torch, transformers  # noqa: F401
from absl import app, flags
from ml_collections.config_flags import config_flags
app.run = lambda *args, **kwargs: None
FLAGS = flags.FLAGS
common = set(FLAGS)
out = {"(common)": {name: None for name in common}}
for target in sys.argv[1:]:
    sys.argv = [target]
    if target.startswith("-m "):
        runpy.run_module(target[3:], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")
    new = [name for name in FLAGS if name not in common]
    # A config-file flag's value: its default config file ('' when it has none).
    out[target] = {
        name: (FLAGS[name].default_unparsed or "") if config_flags.is_config_flag(FLAGS[name]) else None
        for name in new
    }
    for name in new:
        delattr(FLAGS, name)
print("FLAGS_JSON" + json.dumps(out))
"""


@functools.cache
def script_flags(scripts: tuple[str, ...]) -> dict[str, dict[str, str | None]]:
    """``{script: {flag: default config file, or None for a plain flag}}``, plus ``'(common)'``."""
    proc = subprocess.run(
        [sys.executable, "-c", _FLAG_DUMP, *scripts],
        cwd=ROOT,
        env=th.subprocess_env(device_count=1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"importing the scripts failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.split("FLAGS_JSON", 1)[1])


@functools.cache
def load_config(spec: str):
    """The ConfigDict of ``configs/X.py[:ARG]``, loaded as ``--config=`` loads it; raises on a bad one."""
    path, _, arg = spec.partition(":")
    if not (ROOT / path).is_file():
        # ml_collections defers a missing file's error to the first access; say it here.
        raise FileNotFoundError(f"no config file {path}")
    spec = str(ROOT / path) + (f":{arg}" if arg else "")
    return config_flags.ConfigFileFlagParser(name="config").parse(spec)


def config_key_problem(config, key: str) -> str | None:
    """Why ``--config.KEY`` is not a key of ``config`` (None if it is, or from a placeholder on)."""
    node, done = config, []
    for part in key.split("."):
        if is_placeholder(part) or part == "*":
            return None
        if not hasattr(node, "keys") or part not in node.keys():
            known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(a value, not a group)"
            return f"no field {part!r} in config.{'.'.join(done) or '(root)'}; it has: {known}"
        node = node[part]
        done.append(part)
    return None


def python_name_problem(name: str) -> str | None:
    """Why a fully qualified ``imitax.a.b`` name does not resolve (None when it does)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return f"{name}: {'.'.join(parts[:i])} has no attribute {attr!r}"
            obj = getattr(obj, attr)
        return None
    return f"{name}: no such module"


def _runnable(scripts: set[str]) -> tuple[str, ...]:
    return tuple(sorted(s for s in scripts if (ROOT / s).is_file() or _repo_module(s)))


@functools.cache
def _docs_scripts() -> frozenset[str]:
    """Every script the checked docs run: their flags are read in one subprocess, once."""
    return frozenset(c.script for doc in DOCS for s in parse_doc(ROOT / doc)[1] for c in s.commands)


# -- the checks -----------------------------------------------------------------------------------------


def path_problem(token: str, doc_dir: pathlib.Path) -> str | None:
    """Why a repository path a doc names does not exist (None when it does, or is not a repo path)."""
    token = _strip(token).split("#")[0]
    if not token or token.startswith(("/", "~", "$")) or "://" in token or "*" in token:
        return None
    parts = [p for p in token.split("/") if p not in ("", ".")]
    if not parts or is_placeholder(parts[0]):
        return None
    if len(parts) == 1 and not parts[0].endswith(".py"):
        return None  # a bare word (results.json, config.json): a file name, not a path here
    if parts[0] in REPO_DIRS and (ROOT / parts[0]).is_dir():
        base = ROOT
    elif doc_dir != ROOT and ((doc_dir / parts[0]).exists() or parts[0].endswith(".py")):
        base = doc_dir  # benchmarks/README.md's own results/ and scripts
    else:
        return None  # the reader's paths (out/demo, /tmp/run, path/to/hf_dir)
    concrete = []
    for part in parts:
        if is_placeholder(part):
            break
        concrete.append(part)
    if not (base.joinpath(*concrete)).exists():
        return f"{token}: {'/'.join(concrete)} does not exist"
    return None


def _all_flags(sections: list[Section]) -> dict[str, dict[str, str | None]]:
    return script_flags(_runnable({c.script for s in sections for c in s.commands} | _docs_scripts()))


def config_spec_problem(spec: str, doc_dir: pathlib.Path) -> tuple[object | None, str | None]:
    """``(ConfigDict, None)`` for a ``configs/X.py[:ARG]`` that loads, else ``(None, why not or None)``."""
    path, _, arg = spec.partition(":")
    if any(is_placeholder(p) for p in path.split("/")):
        return None, path_problem(path, doc_dir)
    if any(is_placeholder(item.partition("=")[2]) for item in arg.split(",") if "=" in item):
        return None, None  # configs/paper/finetune.py:model=NAME: the reader picks the value
    try:
        return load_config(spec), None
    except Exception as e:  # noqa: BLE001 - any failure to load is the doc's problem to report
        message = str(e).strip().splitlines()[-1]
        return None, f"--config={spec} does not load: {type(e).__name__}: {message}"


def check_command(command: Command, flags, doc_dir: pathlib.Path, problems: list[str]) -> dict[str, list]:
    """Checks one command's script, flags, paths, config and overrides; returns ``{config flag: [configs]}``."""
    where = f"{command.where} ({command.script})"
    if not command.script.startswith("-m ") and (problem := path_problem(command.script, doc_dir)):
        problems.append(f"{command.where}: {problem}")
        return {}
    if command.script.startswith("-m ") and not _repo_module(command.script):
        problems.append(f"{where}: no module {command.script[3:]} in the repository")
        return {}
    if command.script not in flags:
        problems.append(f"{where}: no such script")
        return {}
    defined, common = flags[command.script], flags["(common)"]
    config_specs = {name: default for name, default in defined.items() if default is not None}
    overrides = []
    for arg in command.args:
        arg = _strip(arg)
        if not arg.startswith("--"):
            if problem := path_problem(arg, doc_dir):
                problems.append(f"{where}: {problem}")
            continue
        name, _, value = arg[2:].partition("=")
        head = name.split(".")[0]
        if "." in name and head in config_specs:
            overrides.append((head, name.split(".", 1)[1]))
        elif name in defined or name in common or (name.startswith("no") and name[2:] in defined):
            if name in config_specs:
                config_specs[name] = value
        else:
            problems.append(f"{where}: --{name} is not a flag of {command.script}")
            continue
        if name not in config_specs:
            for piece in value.split(","):
                if problem := path_problem(piece, doc_dir):
                    problems.append(f"{where}: {problem}")
    configs: dict[str, list] = {}
    for flag, spec in config_specs.items():
        if not spec:
            continue
        config, problem = config_spec_problem(spec, doc_dir)
        if problem:
            problems.append(f"{where}: {problem}")
        if config is None:
            continue
        configs.setdefault(flag, []).append(config)
        for head, key in overrides:
            if head == flag and (problem := config_key_problem(config, key)):
                problems.append(f"{where}: --{flag}.{key}: {problem} (in {spec})")
    return configs


@functools.cache
def _docs_context() -> tuple[frozenset[str], dict[str, list]]:
    """The scripts the checked docs run and the configs they load: where a section runs none of its own."""
    configs: dict[str, list] = {}
    for doc in DOCS:
        sections = parse_doc(ROOT / doc)[1]
        for command in (c for s in sections for c in s.commands):
            found = check_command(command, _all_flags(sections), (ROOT / doc).parent, [])
            for flag, loaded in found.items():
                configs.setdefault(flag, []).extend(loaded)
    return _docs_scripts(), configs


def check_doc(path: pathlib.Path) -> list[str]:
    """Every problem of one doc, as ``'FILE:LINE: what'`` lines."""
    text, sections, links, _ = parse_doc(path)
    doc_dir = path.parent
    problems: list[str] = []

    # Links and anchors (GitHub's heading slugs).
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}
    for target, where in links:
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            if target[1:] not in slugs:
                problems.append(f"{where}: no heading for the anchor {target}")
        elif not (doc_dir / target.split("#")[0]).exists():
            problems.append(f"{where}: link target {target} does not exist")

    flags = _all_flags(sections)
    for section in sections:
        section_configs: dict[str, list] = {}  # config flag name -> configs its commands load
        for command in section.commands:
            for flag, loaded in check_command(command, flags, doc_dir, problems).items():
                section_configs.setdefault(flag, []).extend(loaded)

        # Flags named on their own belong to a script, or a config, of the section's commands; in
        # a section that runs no script (or loads no config), to one that the docs run somewhere.
        scripts = section.scripts or _docs_context()[0]
        configs = section_configs or _docs_context()[1]
        for span, where in section.flag_spans:
            for token in span.split():
                if not token.startswith("--"):
                    continue
                name = _strip(token)[2:].partition("=")[0].split("\\")[0]
                head, _, key = name.partition(".")
                if key and head in configs:
                    found = [config_key_problem(c, key) for c in configs[head]]
                    if all(found):  # the message of the config that matched the longest prefix
                        problems.append(f"{where}: --{name}: {max(found, key=lambda p: len(p.split(';')[0]))}")
                elif not any(name in flags.get(s, {}) for s in scripts) and name not in flags["(common)"]:
                    named = ", ".join(sorted(scripts))
                    problems.append(f"{where}: --{name} is not a flag of the section's scripts ({named})")

        for word, where in section.words:
            word = _strip(word)
            if re.fullmatch(r"configs/[\w/]+\.py:\S+", word):
                if problem := config_spec_problem(word, doc_dir)[1]:
                    problems.append(f"{where}: {problem}")
            elif re.fullmatch(r"imitax(\.\w+)+(\(.*\))?", word):
                if problem := python_name_problem(word.split("(")[0]):
                    problems.append(f"{where}: {problem}")
            elif m := re.fullmatch(r"\.\[(\w+)\]", word):
                extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                if m.group(1) not in extras:
                    problems.append(f"{where}: pyproject.toml has no extra {m.group(1)!r}")
            elif problem := path_problem(word, doc_dir):
                problems.append(f"{where}: {problem}")
    return sorted(set(problems), key=lambda p: (p.split(":")[0], int(re.match(r"\d+", p.split(":")[1])[0]), p))


@pytest.mark.parametrize("doc", DOCS)
def test_doc_names_only_what_exists(doc):
    problems = check_doc(ROOT / doc)
    assert not problems, f"{doc} names things that do not exist:\n" + "\n".join(problems)


def test_the_check_catches_invented_names(tmp_path):
    """A check that cannot fail is no check: a doc with one invented name of each kind fails it."""
    fake = tmp_path / "README.md"
    fake.write_text(
        "# Fake\n\n## Training\n\n```bash\n"
        "python scripts/train.py --config=configs/finetune.py:tiny --workdir=DIR --no_such_flag=1 \\\n"
        "    --config.no_such_field=3 --config.data.train=tests/data/no_such_file.json\n"
        "python scripts/no_such_script.py --out=DIR\n"
        "python scripts/sweep.py --config=configs/no_such_dir/NAME.py --workdir=DIR\n"
        "```\n\n"
        "Also `configs/finetune.py:no_such_option=1`, `--config.optimizer.no_such_knob`, "
        "`--no_such_inline_flag`, `docs/no_such_page.md` and [a link](#no-such-heading).\n"
    )
    problems = check_doc(fake)
    text = "\n".join(problems)
    for invented in (
        "--no_such_flag",
        "no field 'no_such_field'",
        "tests/data/no_such_file.json",
        "scripts/no_such_script.py",
        "configs/no_such_dir",
        "no_such_option",
        "no field 'no_such_knob'",
        "--no_such_inline_flag",
        "docs/no_such_page.md",
        "#no-such-heading",
    ):
        assert invented in text, f"the check missed {invented}:\n{text}"
    assert len(problems) == 10, text  # one per invented name: the real ones beside them pass


# -- the Python examples ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dirs(tmp_path_factory):
    """A tiny LLaMA-style imitax checkpoint and its Hugging Face export, with the shipped tokenizer."""
    from hf_models import randomize_imitax

    from imitax import convert, models

    root = tmp_path_factory.mktemp("docs_examples")
    cfg = models.preset(
        "llama-7b",
        **th.TINY_LLAMA | {"max_position_embeddings": 2048},  # MMLU's 5-shot prompts are long
        dtype="float32",
    )
    model = randomize_imitax(models.init_model(cfg, seed=0))
    tokenizer = ROOT / "tests" / "data" / "tokenizer"
    ckpt = convert.save_checkpoint(root / "ckpt", model, tokenizer_dir=tokenizer)
    hf_dir = convert.export_hf(model, root / "hf", tokenizer_dir=tokenizer)
    return {
        "/tmp/run": ckpt,
        "path/to/hf_dir": hf_dir,
        "/tmp/run_eval": root / "eval",
        "/tmp/my_run": root / "my_run",  # the training example's workdir: made by the example
        "/tmp/my_run_eval": root / "my_eval",
    }


def test_readme_python_examples_run(tiny_model_dirs, monkeypatch):
    blocks = parse_doc(ROOT / "README.md")[3]
    assert blocks, "README.md has no ```python examples"
    monkeypatch.chdir(ROOT)  # the examples name tests/data/... relative to the repository
    used = set()
    for code in blocks:
        rest = code
        for path in EXAMPLE_PATHS:  # longest first: /tmp/run_eval before /tmp/run
            for quote in "\"'":
                if f"{quote}{path}{quote}" in code:
                    used.add(path)
                    code = code.replace(f"{quote}{path}{quote}", repr(str(tiny_model_dirs[path])))
                    rest = rest.replace(f"{quote}{path}{quote}", "")
        # No other machine-local path is left for the example to read.
        assert not re.search(r"[\"'](/tmp/|path/to/)", rest), rest
        namespace: dict = {}
        exec(compile(code, "README.md (python example)", "exec"), namespace)

        # What each example says it computes.
        if "out" in namespace:
            out = namespace["out"]
            assert 0 <= out["results"]["mmlu"]["metrics"]["acc"] <= 1
            assert "exact_match" in out["results"]["nq_open"]["metrics"]
            assert (tiny_model_dirs["/tmp/run_eval"] / "results.json").is_file()
        if "result" in namespace:  # the training example: it trained, then scored its own run
            assert namespace["result"]["step"] == 20 and np.isfinite(namespace["result"]["loss"])
            assert 0 <= namespace["scores"]["results"]["mmlu"]["metrics"]["acc"] <= 1
            assert (tiny_model_dirs["/tmp/my_run_eval"] / "results.json").is_file()
        if "new_tokens" in namespace:
            tokens_bt, logits = np.asarray(namespace["tokens_bt"]), np.asarray(namespace["logits"])
            assert logits.dtype == np.float32 and logits.shape == (*tokens_bt.shape, th.MODEL_VOCAB)
            # "attention stays inside a segment": the second example of the packed first row scores
            # as it would alone.
            packed, seg = np.asarray(namespace["packed_logits"]), np.asarray(namespace["seg_bt"])
            second = seg[0] == 2
            alone = np.asarray(namespace["convert"].load_hf(tiny_model_dirs["path/to/hf_dir"])(tokens_bt[:1, second]))
            np.testing.assert_allclose(packed[0, second], alone[0], atol=1e-5)
            assert [len(t) for t in namespace["new_tokens"]] == [32]
            assert namespace["model"].cfg.model_type == "gpt_neox"  # the preset's model, made last
    # The examples still name the paths this test replaces: a renamed path would otherwise send
    # the example to the reader's own /tmp/run, or to nothing.
    assert used == set(EXAMPLE_PATHS), f"README's examples no longer use {set(EXAMPLE_PATHS) - used}"


def test_python_example_paths_are_strings_in_the_code():
    """The replacement above works on string literals: the examples must keep the paths as literals."""
    for code in parse_doc(ROOT / "README.md")[3]:
        literals = {n.value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Constant)}
        for path in EXAMPLE_PATHS:
            assert path in literals or path not in code, path
