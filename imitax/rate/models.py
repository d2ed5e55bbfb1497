"""The tables of a rating study, and the database they live in (SQLite in WAL mode or PostgreSQL).

A study holds prompts, systems and their answers. An *item* is one prompt with two answers, the
sides drawn at random when the study is created and recorded (``answer_a``/``answer_b``); an
attention-check item has one answer deliberately broken and records which side is right
(``expected``). Raters claim items one at a time (an *assignment*, which holds slot ``0 ..
per_item - 1`` of its item) and leave one *judgment* per assignment. Unique constraints make the
database itself refuse a second rater in the same slot, the same rater twice on one item, and a
second judgment of one assignment, whatever the web app does.
"""

from __future__ import annotations

import datetime

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    per_item: Mapped[int]  # judgments wanted per (non-attention) item
    quota: Mapped[int]  # most regular items one rater is given (see store.rater_quota)
    admin_token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    systems: Mapped[list[System]] = relationship(back_populates="study", order_by="System.id")
    raters: Mapped[list[Rater]] = relationship(back_populates="study", order_by="Rater.id")


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (UniqueConstraint("study_id", "key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    key: Mapped[str] = mapped_column(String(200))  # the id in the prompts file
    text: Mapped[str] = mapped_column(Text)


class System(Base):
    __tablename__ = "systems"
    __table_args__ = (UniqueConstraint("study_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(Text)  # the answers file, model path or URL it came from
    study: Mapped[Study] = relationship(back_populates="systems")


class Answer(Base):
    __tablename__ = "answers"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    system_id: Mapped[int | None] = mapped_column(ForeignKey("systems.id"))  # None: an attention check's
    text: Mapped[str] = mapped_column(Text)
    prompt: Mapped[Prompt] = relationship()
    system: Mapped[System | None] = relationship()


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (CheckConstraint("expected IN ('a', 'b')", name="expected_side"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    # The pair as the study names it (system_x:system_y); None for attention checks.
    system_x_id: Mapped[int | None] = mapped_column(ForeignKey("systems.id"))
    system_y_id: Mapped[int | None] = mapped_column(ForeignKey("systems.id"))
    # The sides as the rater sees them, drawn at random at creation.
    answer_a_id: Mapped[int] = mapped_column(ForeignKey("answers.id"))
    answer_b_id: Mapped[int] = mapped_column(ForeignKey("answers.id"))
    expected: Mapped[str | None] = mapped_column(String(1))  # attention checks: the side that is not broken
    rank: Mapped[int]  # random order in which items are handed out
    assigned: Mapped[int] = mapped_column(default=0)  # slots taken so far (regular items)
    prompt: Mapped[Prompt] = relationship()
    answer_a: Mapped[Answer] = relationship(foreign_keys=[answer_a_id])
    answer_b: Mapped[Answer] = relationship(foreign_keys=[answer_b_id])
    system_x: Mapped[System | None] = relationship(foreign_keys=[system_x_id])
    system_y: Mapped[System | None] = relationship(foreign_keys=[system_y_id])


# In the order store._claim asks for items (started ones first), so the next free item is found
# by walking the index instead of sorting the study's items on every claim.
Index("ix_items_open", Item.study_id, Item.assigned.desc(), Item.rank)


class Rater(Base):
    __tablename__ = "raters"
    __table_args__ = (UniqueConstraint("study_id", "label"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    label: Mapped[str] = mapped_column(String(20))  # pseudonym used in exports: r001, r002, ...
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    started_at: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True))
    study: Mapped[Study] = relationship(back_populates="raters")


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("item_id", "slot"),  # NULL slots (attention checks) never collide
        UniqueConstraint("item_id", "rater_id"),
        Index("ix_assignments_rater", "rater_id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id"))
    slot: Mapped[int | None]  # regular items: which of the item's per_item judgments this is
    due: Mapped[int | None]  # attention checks: shown once the rater has judged this many regular items
    # When the item was handed out: claimed (regular items) or first shown (attention checks, which
    # are assigned in advance and stay None until then: they cannot be judged unseen).
    shown_at: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True))
    item: Mapped[Item] = relationship()
    rater: Mapped[Rater] = relationship()
    judgment: Mapped[Judgment | None] = relationship(back_populates="assignment")


class Judgment(Base):
    __tablename__ = "judgments"
    __table_args__ = (CheckConstraint("choice IN ('a', 'b', 'tie')", name="choice_value"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    choice: Mapped[str] = mapped_column(String(3))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    assignment: Mapped[Assignment] = relationship(back_populates="judgment")


class Setting(Base):
    """Server-wide values every worker process must share (the CSRF signing key)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(50), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def database_url(url: str) -> str:
    """``url`` with the psycopg 3 driver named: ``postgresql://`` and ``postgres://`` are accepted."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_setup(engine: Engine) -> None:
    """WAL mode, enforced foreign keys, and every transaction ``BEGIN IMMEDIATE``.

    Python's sqlite3 module (3.11) issues no BEGIN before a SELECT, and a deferred transaction that
    reads and then writes fails with "database is locked" (no busy wait) when another connection
    committed in between. Taking the write lock up front makes each transaction wait its turn
    (busy_timeout) and then run alone, which is also what makes claiming an item race-free on SQLite.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # let SQLAlchemy's "begin" event issue BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")  # WAL's recommended setting: durable at checkpoints
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def open_database(url: str, create: bool = True) -> Engine:
    """An engine for ``url`` (``sqlite:///FILE`` or ``postgresql://...``), with the tables created."""
    url = database_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=20)
        _sqlite_setup(engine)
    else:
        engine = create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)
    if create:
        Base.metadata.create_all(engine)
    return engine
