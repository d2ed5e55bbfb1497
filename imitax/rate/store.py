"""Creating a study, handing items to raters and recording their judgments, safely under concurrency.

Raters claim items as they go (``next_item``) rather than from a list fixed in advance, so a study
fills up however many raters turn up and however fast each one is. Every claim and judgment runs
in one transaction that first locks the rater's row (one rater's requests take turns) and then the
item's row (``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, which never waits for an item
another rater holds; SQLite has one writer at a time, see models._sqlite_setup). Unique
constraints back this up: an item's slot, a rater on an item and a judgment of an assignment can
each exist only once.

Tokens are ``secrets.token_urlsafe(32)`` (256 random bits) and only their SHA-256 is stored. A
plain hash is enough for secrets of that entropy: a slow password hash defends guessable
passwords, and nobody can enumerate 2**256 tokens, so a leaked database reveals no usable link.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import secrets
import time
from collections.abc import Sequence

from sqlalchemy import Engine, and_, exists, func, select
from sqlalchemy.orm import Session, aliased, joinedload

from imitax.rate.models import Answer, Assignment, Item, Judgment, Prompt, Rater, Study, System, utcnow

CHOICES = ("a", "b", "tie")
MAX_REASON = 2000


class StudyError(ValueError):
    """Bad study input: the message is one line naming what, where and what to do."""


class Unauthorized(Exception):
    """No rater (or admin) has this token."""


class Forbidden(Exception):
    """The token is valid but the thing asked for is not this rater's."""


class Conflict(Exception):
    """A different judgment of this item was already recorded."""


def hash_token(token: str) -> str:
    """What the database stores of a token (see the module docstring for why SHA-256 suffices)."""
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading a study's files


def read_jsonl(path: str, fields: Sequence[str]) -> list[dict]:
    """The records of a JSONL file, each checked to hold ``fields`` as strings."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise StudyError(f"{path}: cannot read ({e.strerror})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise StudyError(f"{path}:{number}: not JSON ({e.msg})") from None
        missing = [k for k in fields if not isinstance(record, dict) or not isinstance(record.get(k), str)]
        if missing:
            raise StudyError(f"{path}:{number}: needs string field(s) {', '.join(missing)}")
        records.append({**record, "_line": number})
    if not records:
        raise StudyError(f"{path}: no records")
    return records


def by_id(path: str, records: list[dict], value: str) -> dict[str, str]:
    """``{id: record[value]}``, refusing a repeated id."""
    out, lines = {}, {}
    for record in records:
        key = record["id"]
        if key in out:
            raise StudyError(f"{path}:{record['_line']}: duplicate id {key!r} (first on line {lines[key]})")
        out[key], lines[key] = record[value], record["_line"]
    return out


def read_prompts(path: str) -> dict[str, str]:
    """A prompts file, JSONL ``{"id", "prompt"}``, as ``{id: prompt}``."""
    return by_id(path, read_jsonl(path, ("id", "prompt")), "prompt")


def read_answers(path: str) -> dict[str, str]:
    """A system's answers, JSONL ``{"id", "response"}``, as ``{id: response}``."""
    return by_id(path, read_jsonl(path, ("id", "response")), "response")


def is_model_source(source: str) -> bool:
    """Whether a system's source is something to generate answers from (a URL or a model directory)."""
    return source.startswith(("http://", "https://")) or os.path.isdir(source)


def read_attention_checks(path: str) -> list[tuple[str, str, str]]:
    """Attention checks, JSONL ``{"prompt", "good", "broken"}``: a prompt, a fine answer, a broken one."""
    return [(r["prompt"], r["good"], r["broken"]) for r in read_jsonl(path, ("prompt", "good", "broken"))]


# ---------------------------------------------------------------------------------------------
# Creating a study


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """Everything a study is made of. ``answers[system][prompt_id]`` is that system's answer."""

    name: str
    prompts: dict[str, str]
    answers: dict[str, dict[str, str]]
    sources: dict[str, str]  # system -> the file, model path or URL its answers came from
    pairs: list[tuple[str, str]]
    per_item: int = 3
    raters: int = 10
    attention_checks: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Tokens:
    """The secrets of a new study: shown once, never stored in the clear."""

    admin: str
    raters: list[tuple[str, str]]  # (pseudonym, token)


def parse_pairs(text: str, systems: Sequence[str]) -> list[tuple[str, str]]:
    """``"A:B,C:D"`` as pairs of known systems; empty: every pair of systems in the order given."""
    if not text.strip():
        return [(x, y) for i, x in enumerate(systems) for y in systems[i + 1 :]]
    pairs = []
    for part in text.split(","):
        x, sep, y = part.strip().partition(":")
        if not sep or not x or not y or x == y:
            raise StudyError(f"--pairs: {part.strip()!r} is not SYSTEM_A:SYSTEM_B of two different systems")
        for name in (x, y):
            if name not in systems:
                raise StudyError(f"--pairs: {name!r} is not a --system (systems: {', '.join(systems)})")
        if (x, y) in pairs or (y, x) in pairs:
            raise StudyError(f"--pairs: {x}:{y} given twice")
        pairs.append((x, y))
    return pairs


def rater_quota(n_items: int, per_item: int, raters: int) -> int:
    """The most regular items one rater is given: ceil(items * per_item / (raters - per_item + 1)).

    Not just the fair share ceil(items * per_item / raters): near the end the only items left open
    may be ones that every rater with quota left has already judged. If an item is short of a
    judgment when everyone has finished, fewer than per_item raters judged it, so at least
    raters - per_item + 1 raters used their whole quota; with this quota they made at least
    items * per_item judgments, so no item can be short: every item gets exactly per_item.
    """
    return min(n_items, math.ceil(n_items * per_item / (raters - per_item + 1)))


def check(spec: StudySpec) -> None:
    """Raises StudyError for a study that could not be run as asked."""
    if not spec.name.strip():
        raise StudyError("--study: give the study a name")
    if len(spec.answers) < 2:
        raise StudyError("--system: give at least two systems (NAME=ANSWERS_FILE)")
    if spec.per_item < 1:
        raise StudyError(f"--per_item must be at least 1, got {spec.per_item}")
    if spec.raters < spec.per_item:
        raise StudyError(f"--raters={spec.raters} is fewer than --per_item={spec.per_item}: items could not be filled")
    for system, answers in spec.answers.items():
        missing = [k for k in spec.prompts if k not in answers]
        if missing:
            shown = ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise StudyError(f"--system={system}: no answer for {len(missing)} prompt id(s): {shown}")


def create_study(engine: Engine, spec: StudySpec) -> Tokens:
    """Writes the study in one transaction (all of it or nothing) and returns its tokens."""
    check(spec)
    rng = random.Random(spec.seed)
    with Session(engine) as session, session.begin():
        if session.scalar(select(Study.id).where(Study.name == spec.name)) is not None:
            raise StudyError(f"--study: a study named {spec.name!r} already exists in this database")
        n_items = len(spec.prompts) * len(spec.pairs)
        admin = secrets.token_urlsafe(32)
        study = Study(
            name=spec.name,
            per_item=spec.per_item,
            quota=rater_quota(n_items, spec.per_item, spec.raters),
            admin_token_hash=hash_token(admin),
        )
        session.add(study)
        systems = {name: System(study=study, name=name, source=spec.sources[name]) for name in spec.answers}
        session.add_all(systems.values())
        session.flush()
        items = _regular_items(session, study, spec, systems, rng) + _attention_items(session, study, spec, rng)
        ranks = rng.sample(range(len(items)), len(items))
        for item, rank in zip(items, ranks, strict=True):
            item.rank = rank
        session.add_all(items)
        tokens = _add_raters(session, study, spec, items, rng)
    return Tokens(admin=admin, raters=tokens)


def _regular_items(session, study, spec, systems, rng) -> list[Item]:
    items = []
    for key, text in spec.prompts.items():
        prompt = Prompt(study_id=study.id, key=key, text=text)
        answers = {
            name: Answer(prompt=prompt, system=system, text=spec.answers[name][key]) for name, system in systems.items()
        }
        session.add_all([prompt, *answers.values()])
        for x, y in spec.pairs:
            a, b = (x, y) if rng.random() < 0.5 else (y, x)
            items.append(
                Item(study_id=study.id, prompt=prompt, system_x=systems[x], system_y=systems[y],
                     answer_a=answers[a], answer_b=answers[b])
            )  # fmt: skip
    return items


def _attention_items(session, study, spec, rng) -> list[Item]:
    items = []
    for number, (text, good, broken) in enumerate(spec.attention_checks, 1):
        prompt = Prompt(study_id=study.id, key=f"attention-{number}", text=text)
        good_answer, broken_answer = Answer(prompt=prompt, text=good), Answer(prompt=prompt, text=broken)
        session.add_all([prompt, good_answer, broken_answer])
        if rng.random() < 0.5:
            items.append(
                Item(study_id=study.id, prompt=prompt, answer_a=good_answer, answer_b=broken_answer, expected="a")
            )
        else:
            items.append(
                Item(study_id=study.id, prompt=prompt, answer_a=broken_answer, answer_b=good_answer, expected="b")
            )
    return items


def _add_raters(session, study, spec, items, rng) -> list[tuple[str, str]]:
    """Raters, each with every attention check due at a random point of their work."""
    session.flush()
    attention = [item for item in items if item.expected is not None]
    tokens = []
    width = max(3, len(str(spec.raters)))
    for number in range(1, spec.raters + 1):
        token, label = secrets.token_urlsafe(32), f"r{number:0{width}d}"
        rater = Rater(study=study, label=label, token_hash=hash_token(token))
        session.add(rater)
        for item in attention:
            session.add(Assignment(item=item, rater=rater, due=rng.randint(1, max(study.quota, 1))))
        tokens.append((label, token))
    return tokens


# ---------------------------------------------------------------------------------------------
# Raters at work


@dataclasses.dataclass(frozen=True)
class Served:
    """An item as a rater sees it: no system names, no other rater's choice."""

    item_id: int
    prompt: str
    a: str
    b: str
    done: int
    total: int


def rater_for(session: Session, token: str, lock: bool = False) -> Rater:
    """The rater holding ``token`` (its row locked when ``lock``), else Unauthorized."""
    query = select(Rater).where(Rater.token_hash == hash_token(token)).options(joinedload(Rater.study, innerjoin=True))
    rater = session.scalars(query.with_for_update(of=Rater) if lock else query).first()
    if rater is None:
        raise Unauthorized
    return rater


def study_for_admin(session: Session, token: str) -> Study:
    study = session.scalars(select(Study).where(Study.admin_token_hash == hash_token(token))).first()
    if study is None:
        raise Unauthorized
    return study


def _tally(session: Session, rater_id: int) -> tuple[int, int, int]:
    """(regular items judged, attention checks judged, attention checks given) of a rater, in one query."""
    attention = Assignment.slot.is_(None)
    judged = Judgment.id.is_not(None)
    query = (
        select(
            func.count(Judgment.id).filter(~attention),
            func.count(Judgment.id).filter(attention & judged),
            func.count(Assignment.id).filter(attention),
        )
        .select_from(Assignment)
        .outerjoin(Judgment, Judgment.assignment_id == Assignment.id)
        .where(Assignment.rater_id == rater_id)
    )
    return tuple(session.execute(query).one())


def _open(rater_id: int):
    """The rater's assignments without a judgment, oldest first."""
    no_judgment = ~exists().where(Judgment.assignment_id == Assignment.id)
    return select(Assignment).where(Assignment.rater_id == rater_id, no_judgment).order_by(Assignment.id)


def _claim(session: Session, rater: Rater, study: Study) -> Assignment | None:
    """Takes the next free slot of an item this rater has not seen; None when there is none.

    Items already started come first (a study stopped early then has complete items). On
    PostgreSQL, ``FOR UPDATE SKIP LOCKED`` passes over items other raters are claiming at this
    moment, and never waits for a row lock: a transaction that waited for one while holding
    another (PostgreSQL keeps the lock of a row it locked and then found filled) could deadlock.
    When every candidate is locked, the claim looks again (each statement sees what was committed
    since) until one is free or none is left.
    """
    seen = select(Assignment.item_id).where(Assignment.rater_id == rater.id)
    candidates = select(Item).where(
        Item.study_id == study.id,
        Item.expected.is_(None),
        Item.assigned < study.per_item,
        Item.id.not_in(seen),
    )
    query = candidates.order_by(Item.assigned.desc(), Item.rank).limit(1).with_for_update(skip_locked=True)
    for attempt in itertools.count():
        item = session.scalars(query).first()
        if item is not None:
            break
        if not session.scalar(select(candidates.exists())):
            return None
        time.sleep(min(0.001 * 2**attempt, 0.05))  # the candidates' claims are committing
    assignment = Assignment(item=item, rater=rater, slot=item.assigned, shown_at=utcnow())
    item.assigned += 1
    session.add(assignment)
    session.flush()
    return assignment


def _next_assignment(session: Session, rater: Rater) -> Assignment | None:
    """What the rater works on next (marked shown): the item left open, a due attention check, or a new item."""
    assignment = _pick(session, rater)
    if assignment is not None and assignment.shown_at is None:
        assignment.shown_at = utcnow()
    return assignment


def _pick(session: Session, rater: Rater) -> Assignment | None:
    regular_done = _tally(session, rater.id)[0]
    open_ = session.scalars(_open(rater.id)).all()
    for assignment in open_:  # resume (a reload, a lost connection)
        if assignment.slot is not None:
            return assignment
    for assignment in sorted(open_, key=lambda a: a.due):
        if assignment.due <= regular_done:
            return assignment
    if regular_done < rater.study.quota:
        claimed = _claim(session, rater, rater.study)
        if claimed is not None:
            return claimed
    return min(open_, key=lambda a: a.due, default=None)  # no items left: the attention checks remain


def _served(session: Session, rater: Rater, assignment: Assignment) -> Served:
    done, total = progress(session, rater)
    a, b = aliased(Answer), aliased(Answer)
    prompt, a_text, b_text = session.execute(
        select(Prompt.text, a.text, b.text)
        .select_from(Item)
        .join(Prompt, Item.prompt_id == Prompt.id)
        .join(a, Item.answer_a_id == a.id)
        .join(b, Item.answer_b_id == b.id)
        .where(Item.id == assignment.item_id)
    ).one()
    return Served(assignment.item_id, prompt, a_text, b_text, done, total)


def progress(session: Session, rater: Rater) -> tuple[int, int]:
    """(judgments made, judgments this rater is asked for at most)."""
    regular, attention_done, attention = _tally(session, rater.id)
    return regular + attention_done, rater.study.quota + attention


def next_item(engine: Engine, token: str) -> Served | None:
    """The rater's current item (claiming one if needed); None when they are done."""
    with Session(engine) as session, session.begin():
        rater = rater_for(session, token, lock=True)
        assignment = _next_assignment(session, rater)
        return None if assignment is None else _served(session, rater, assignment)


def rate(engine: Engine, token: str, item_id: int, choice: str, reason: str = "") -> bool:
    """Records a judgment; True if new, False if this exact judgment was already recorded.

    Raises Unauthorized (unknown token), Forbidden (item not assigned to this rater), Conflict (a
    different judgment of the item is recorded) or ValueError (a choice outside a/b/tie).
    """
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    reason = reason.strip()[:MAX_REASON]
    with Session(engine) as session, session.begin():
        rater = rater_for(session, token, lock=True)
        assignment = session.scalars(
            select(Assignment)
            .where(Assignment.rater_id == rater.id, Assignment.item_id == item_id)
            .options(joinedload(Assignment.judgment))
        ).first()
        if assignment is None or assignment.shown_at is None:  # not this rater's, or not shown yet
            raise Forbidden
        if assignment.judgment is not None:
            if (assignment.judgment.choice, assignment.judgment.reason) == (choice, reason):
                return False
            raise Conflict
        session.add(Judgment(assignment=assignment, choice=choice, reason=reason))
    return True


def start(engine: Engine, token: str) -> None:
    """Marks that the rater read the instructions."""
    with Session(engine) as session, session.begin():
        rater = rater_for(session, token, lock=True)
        rater.started_at = rater.started_at or utcnow()


def has_started(engine: Engine, token: str) -> bool:
    with Session(engine) as session:
        return rater_for(session, token).started_at is not None


# ---------------------------------------------------------------------------------------------
# Progress and export


def admin_progress(engine: Engine, token: str) -> dict:
    """The study's progress overall and per rater, for the admin page."""
    with Session(engine) as session:
        study = study_for_admin(session, token)
        items = session.scalar(select(func.count(Item.id)).where(Item.study_id == study.id, Item.expected.is_(None)))
        judgments = session.scalar(
            select(func.count(Judgment.id))
            .join(Assignment, Judgment.assignment_id == Assignment.id)
            .join(Item, Assignment.item_id == Item.id)
            .where(Item.study_id == study.id, Assignment.slot.is_not(None))
        )
        per_item = (
            select(Assignment.item_id, func.count(Judgment.id).label("n"))
            .join(Judgment, Judgment.assignment_id == Assignment.id)
            .join(Item, Assignment.item_id == Item.id)
            .where(Item.study_id == study.id, Assignment.slot.is_not(None))
            .group_by(Assignment.item_id)
            .subquery()
        )
        complete = session.scalar(select(func.count()).select_from(per_item).where(per_item.c.n >= study.per_item))
        raters = []
        for rater in study.raters:
            done, total = progress(session, rater)
            raters.append(
                {"rater": rater.label, "started": rater.started_at is not None, "done": done, "total": total,
                 "attention_missed": _attention_missed(session, rater.id)}
            )  # fmt: skip
        return {
            "study": study.name,
            "systems": [s.name for s in study.systems],
            "items": items,
            "items_complete": complete,
            "judgments": judgments,
            "judgments_wanted": items * study.per_item,
            "raters": raters,
        }


def _attention_missed(session: Session, rater_id: int) -> int:
    return session.scalar(
        select(func.count(Judgment.id))
        .join(Assignment, Judgment.assignment_id == Assignment.id)
        .join(Item, Assignment.item_id == Item.id)
        .where(Assignment.rater_id == rater_id, Item.expected.is_not(None), Judgment.choice != Item.expected)
    )


def judgments(engine: Engine, study_name: str) -> tuple[Study, list[dict]]:
    """Every judgment of a study, sides mapped back to systems, raters by pseudonym."""
    with Session(engine) as session:
        study = session.scalars(select(Study).where(Study.name == study_name)).first()
        if study is None:
            known = session.scalars(select(Study.name).order_by(Study.id)).all()
            raise StudyError(f"--study: no study named {study_name!r} (studies: {', '.join(known) or 'none'})")
        rows = session.scalars(
            select(Judgment)
            .join(Assignment, Judgment.assignment_id == Assignment.id)
            .join(Item, and_(Assignment.item_id == Item.id, Item.study_id == study.id))
            .options(
                joinedload(Judgment.assignment).options(
                    joinedload(Assignment.rater),
                    joinedload(Assignment.item).options(
                        joinedload(Item.prompt),
                        joinedload(Item.answer_a).joinedload(Answer.system),
                        joinedload(Item.answer_b).joinedload(Answer.system),
                        joinedload(Item.system_x),
                        joinedload(Item.system_y),
                    ),
                )
            )
            .order_by(Judgment.id)
        ).all()
        return study, [_row(j) for j in rows]


def _row(judgment: Judgment) -> dict:
    item = judgment.assignment.item
    attention = item.expected is not None
    side = {"a": item.answer_a, "b": item.answer_b}
    name = lambda answer: answer.system.name if answer.system else ""
    return {
        "judgment_id": judgment.id,
        "rater": judgment.assignment.rater.label,
        "item_id": item.id,
        "prompt_id": item.prompt.key,
        "attention_check": attention,
        "system_x": "" if attention else item.system_x.name,
        "system_y": "" if attention else item.system_y.name,
        "system_a": name(item.answer_a),
        "system_b": name(item.answer_b),
        "choice": judgment.choice,
        "preferred": "tie" if judgment.choice == "tie" else (name(side[judgment.choice]) or judgment.choice),
        "expected": item.expected or "",
        "reason": judgment.reason,
        "created_at": judgment.created_at.isoformat(),
        "seconds": round((judgment.created_at - judgment.assignment.shown_at).total_seconds(), 1),
    }
