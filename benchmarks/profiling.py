"""Where a compiled program's time goes: each HLO op's own time from a ``jax.profiler`` trace, by kind of work.

Shared by the train-step and generation benchmarks. XLA:CPU's thunk executor records one
trace event per executed HLO op; :func:`parse_hlo` files each op of the compiled module under
a kind of work (the matmuls by what they multiply, copies, other fusions, loop control) and
:func:`traced_op_times` charges each op its own time.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import time

import jax
import numpy as np

# Ops that only move data (a fusion made of nothing else is a copy, as far as the profile is concerned).
_MOVES = {"parameter", "copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "dynamic-slice",
          "dynamic-update-slice", "concatenate", "pad", "tuple", "get-tuple-element", "constant", "iota",
          "bitcast-convert"}  # fmt: skip
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<type>.+?) (?P<op>[a-z][a-z0-9\-]*)\((?P<args>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?(?P<name>[\w.\-]+) \(.*\{$")


@dataclasses.dataclass(frozen=True)
class HloOp:
    """One instruction of a compiled module: what the profile files its time under."""

    category: str  # matmul: projections / attention / LM head; copies; other fusions; loop overhead
    phase: str  # forward, backward, update (from the op's metadata: jvp(...), transpose(jvp(...)), neither)
    # (the loss's gradient is computed with its forward, in a custom VJP: its matmuls count as forward)
    flops: float  # of its dots (0 for everything else)
    shape: str  # of its dot, 'lhs x rhs -> out', or its result type


def _dims(hlo_type: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", hlo_type)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def parse_hlo(text: str, vocab_size: int) -> dict[str, HloOp]:
    """Classifies every instruction of a compiled module's ``as_text()`` by name (names are module-unique)."""
    computations: dict[str, list[re.Match]] = {}
    current: list[re.Match] = []
    for line in text.splitlines():
        if m := _COMPUTATION.match(line):
            current = computations.setdefault(m["name"], [])
        elif m := _INSTRUCTION.match(line):
            current.append(m)

    def dot_of(instructions: list[re.Match], types: dict[str, str]) -> tuple[float, str, bool, bool]:
        """(FLOPs, shape, batched?, touches the vocabulary?) of the dots among ``instructions``."""
        flops, shape, batched, vocab = 0.0, "", False, False
        for m in instructions:
            if m["op"] != "dot":
                continue
            lhs, rhs = re.findall(r"%([\w.\-]+)", m["args"])[:2]
            lhs_dims, rhs_dims, out = _dims(types.get(lhs, "")), _dims(types.get(rhs, "")), _dims(m["type"])
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", m["args"])
            k = np.prod([lhs_dims[int(i)] for i in contracting.group(1).split(",") if i]) if contracting else 1
            flops += 2.0 * float(np.prod(out)) * float(k)
            shape = f"{lhs_dims} x {rhs_dims} -> {out}"
            batched |= "lhs_batch_dims" in m["args"]
            vocab |= vocab_size in lhs_dims + rhs_dims + out
        return flops, shape, batched, vocab

    def phase_of(op_name: str) -> str | None:
        return "backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name else None

    ops: dict[str, HloOp] = {}
    types = {name: {m["name"]: m["type"] for m in instructions} for name, instructions in computations.items()}
    for computation, instructions in computations.items():
        # Some instructions carry no metadata (the loss's custom-VJP gradient dots, buffer fills):
        # they take the phase of the first labelled instruction of their computation.
        labelled = (phase_of(n.group(1)) for i in instructions if (n := re.search(r'op_name="([^"]*)"', i["args"])))
        default_phase = next((p for p in labelled if p), "update")
        for m in instructions:
            op, args = m["op"], m["args"]
            called = re.search(r"calls=%([\w.\-]+)", args)
            if called and op == "fusion":
                inner = computations.get(called.group(1), [])
                flops, shape, batched, vocab = dot_of(inner, types.get(called.group(1), {}))
            else:
                inner = [m] if op == "dot" else []
                flops, shape, batched, vocab = dot_of(inner, types[computation])
            if flops:
                category = "matmul: LM head" if vocab else "matmul: attention" if batched else "matmul: projections"
            elif op == "while":
                category = "loop control (while: own time)"
            elif op == "fusion" and inner and {i["op"] for i in inner} <= {"parameter", "constant", "broadcast"}:
                category = "buffer fills (a broadcast constant)"
            elif op in ("copy", "transpose") or (op == "fusion" and inner and {i["op"] for i in inner} <= _MOVES):
                category = "copies, transposes, slices"
            elif op == "fusion":
                category = "other fusions (norms, softmax, activations, AdamW)"
            else:
                category = f"other ops ({op})"
            name_m = re.search(r'op_name="([^"]*)"', args)
            phase = (phase_of(name_m.group(1)) or "update") if name_m else default_phase
            ops[m["name"]] = HloOp(category, phase, flops, shape or re.sub(r"\{[\d,]*\}", "", m["type"])[:40])
    return ops


def traced_op_times(call, logdir: str) -> tuple[dict[str, list[float]], float]:
    """Runs ``call()`` under ``jax.profiler.trace``; ``({hlo op: [executions, own seconds]}, wall seconds)``.

    XLA:CPU's thunk executor records one event per executed HLO op (attribute ``hlo_op``); a
    while loop's event encloses its body's, so each op is charged its own time only (its
    duration less that of the events nested in it on the same thread).
    """
    with jax.profiler.trace(logdir):
        start = time.perf_counter()
        jax.block_until_ready(call())
        wall = time.perf_counter() - start
    path = max(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    times: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            events = []
            for e in line.events:
                op = dict(e.stats).get("hlo_op")
                if op:
                    events.append((e.start_ns, e.start_ns + e.duration_ns, op))
            events.sort(key=lambda x: (x[0], -x[1]))
            stack: list[list] = []  # [end, op, own ns]
            for start_ns, end_ns, op in events:
                while stack and stack[-1][0] <= start_ns:
                    end, name, own = stack.pop()
                    times[name][1] += own / 1e9
                if stack:
                    stack[-1][2] -= end_ns - start_ns  # nested: not the enclosing op's own time
                stack.append([end_ns, op, end_ns - start_ns])
                times[op][0] += 1
            for _, name, own in stack:
                times[name][1] += own / 1e9
    return dict(times), wall
