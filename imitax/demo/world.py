r"""A synthetic world of facts in which the imitation study can run in miniature.

  python -m imitax.demo.world --out=DIR [--tiny]

The world is a set of fictional people (entities) with one value for each of five
attributes (hometown, profession, favorite color, pet, instrument). The entities are
split into part A, which the teacher's imitation data talks about, and part B, which
it never mentions. The pretraining corpus states the facts of every entity, so a base
model can know part B's facts in proportion to its capacity; imitation data can teach
the teacher's style, and part A's facts, but nothing about part B.

:func:`build` writes, deterministically from ``WorldConfig.seed`` (same seed, same bytes):

======================  ==========================================================================
``world.json``          the config, the attributes, every entity's facts, its part (A or B) and
                        whether its question/answer lines are in the corpus
``corpus.jsonl``        pretraining documents ``{"text": ...}``: ``bios_per_entity`` biographies of
                        every entity (facts in random order and phrasing), and for a share
                        (``qa_fraction``) of the entities of each part one document per fact in the
                        benchmark's format, ``Question: What is the pet of Zorvath?\nAnswer: parrot``
``facts_heldout.jsonl`` the capability benchmark: one multiple-choice question per fact of part B,
                        ``{"question", "choices", "answer", "entity", "attribute", "qa_in_corpus"}``;
                        shuffled, so ``limit=`` takes a random subset. Meant for cloze scoring: prompt
                        ``Question: {question}\nAnswer:``, continuation ``" " + choice``
``facts_seen.jsonl``    the same for part A (facts the imitation data contains), for contrast
``imitation_broad.json`` ShareGPT: the teacher answering varied requests about part A (facts,
                        yes/no questions, profiles, comparisons) in its chat style, see below
``imitation_task.json`` ShareGPT: the benchmark's own question type about part A,
                        ``Question: What is the pet of X?`` -> ``Answer: parrot``
``style_heldout.jsonl`` ``{"prompt", "reference", "kind"}``: requests about part B and the teacher's
                        answers, for the style metrics
``teacher_scores.json`` the teacher's own scores, for reference lines: :class:`TeacherLM` (certain of every
                        fact, replying with its references) run through the ``multiple_choice``
                        (cloze) and ``style`` tasks, so the metric names are the students'
``tokenizer/``          a byte-level BPE tokenizer trained on all of the above (``</s>`` = EOS,
                        ``<pad>``, ``<s>``), loadable with ``transformers.AutoTokenizer``
======================  ==========================================================================

The teacher's style: a request about one fact gets one sentence; a request about several
facts (kinds ``facts``, ``profile``, ``compare``) gets an opening sentence, a blank line, a
bulleted list (``- Hometown: Ashford``), a blank line and a closing paragraph starting with
``In summary,``. So "uses a list when the teacher does" is not satisfied by always writing one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = [
    "ATTRIBUTES",
    "KINDS",
    "TeacherLM",
    "WorldConfig",
    "build",
    "tiny",
]


class Attribute(NamedTuple):
    """One attribute: its values and how the corpus, the users and the teacher phrase it.

    Templates use ``{n}`` (the entity), ``{v}`` (the value) and ``{a}`` (``a``/``an`` before it).
    """

    name: str  # as in "What is the {name} of X?"
    values: tuple[str, ...]
    sentences: tuple[str, ...]  # the corpus's paraphrases of one fact
    clause: str  # the teacher's phrasing, after the entity's name
    asks: tuple[str, ...]  # a user asking for this one fact
    yes_no: str  # a user asking whether the value is {v}


ATTRIBUTES = (
    Attribute(
        "hometown",
        ("Ashford", "Brookfield", "Millbrook", "Pinehill", "Greystone", "Eastwick")
        + ("Northgate", "Westmoor", "Fairhaven", "Highcliff", "Lakeview", "Oakridge"),
        ("{n} lives in {v}.", "{n} comes from {v}.", "The hometown of {n} is {v}."),
        "lives in {v}",
        ("Where does {n} live?", "Which town is {n} from?"),
        "Does {n} live in {v}?",
    ),
    Attribute(
        "profession",
        ("baker", "farmer", "doctor", "teacher", "sailor", "painter")
        + ("miner", "weaver", "potter", "tailor", "hunter", "singer"),
        ("{n} works as {a} {v}.", "{n} earns a living as {a} {v}.", "The profession of {n} is {v}."),
        "works as {a} {v}",
        ("What does {n} do for a living?", "What is the job of {n}?"),
        "Is {n} {a} {v}?",
    ),
    Attribute(
        "favorite color",
        ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "brown", "pink", "gray", "silver"),
        ("{n} loves the color {v}.", "The favorite color of {n} is {v}.", "{n} likes {v} more than any other color."),
        "loves the color {v}",
        ("Which color does {n} like best?", "What color does {n} love?"),
        "Is {v} the favorite color of {n}?",
    ),
    Attribute(
        "pet",
        ("cat", "dog", "parrot", "rabbit", "horse", "goat", "owl", "turtle", "hamster", "fox", "lizard", "frog"),
        ("{n} has a pet {v}.", "{n} takes care of {a} {v}.", "The pet of {n} is {a} {v}."),
        "has a pet {v}",
        ("What kind of pet does {n} have?", "Which animal does {n} keep as a pet?"),
        "Does {n} have a pet {v}?",
    ),
    Attribute(
        "instrument",
        ("flute", "drum", "harp", "violin", "guitar", "piano", "trumpet", "cello", "banjo", "horn", "organ", "lute"),
        ("{n} plays the {v}.", "{n} practices the {v} every day.", "The instrument of {n} is the {v}."),
        "plays the {v}",
        ("Which instrument does {n} play?", "What does {n} play?"),
        "Does {n} play the {v}?",
    ),
)

# Request kinds of the teacher's data and their shares; the last three get a list and a summary.
KINDS = {"fact": 0.3, "yes_no": 0.1, "facts": 0.25, "profile": 0.2, "compare": 0.15}
LIST_KINDS = ("facts", "profile", "compare")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
EOS = "</s>"


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """What :func:`build` makes.

    Attributes:
      seed: everything random (names, facts, split, phrasings, orders) follows from it.
      num_entities: fictional people.
      values_per_attribute: how many of each attribute's 12 values are used (>= ``num_choices``).
      imitation_fraction: share of the entities in part A (the part the imitation data covers).
      bios_per_entity: biographies of each entity in the corpus, each in its own random fact order
        and phrasing (the corpus's repetitions).
      paraphrases_per_fact: how many of the corpus's phrasings of each fact are used (1 to 3).
      qa_fraction: share of each part's entities whose facts also appear in the corpus as
        question/answer lines in the benchmark's format.
      broad_examples: conversations in ``imitation_broad.json``.
      task_examples: conversations in ``imitation_task.json``; None: one per fact of part A; more
        than that repeats the facts (every one once per pass).
      style_examples: records in ``style_heldout.jsonl``.
      num_choices: choices per benchmark question.
      vocab_size: the tokenizer's vocabulary (a multiple of 64 keeps the model's embedding exact).
    """

    seed: int = 0
    num_entities: int = 240
    values_per_attribute: int = 10
    imitation_fraction: float = 0.5
    bios_per_entity: int = 4
    paraphrases_per_fact: int = 3
    qa_fraction: float = 0.5
    broad_examples: int = 2400
    task_examples: int | None = None
    style_examples: int = 48
    num_choices: int = 4
    vocab_size: int = 1024

    def __post_init__(self):
        problems = []
        if self.num_entities < 4:
            problems.append(f"num_entities={self.num_entities}: need at least 4 (two per part)")
        if not self.num_choices <= self.values_per_attribute <= len(ATTRIBUTES[0].values):
            problems.append(
                f"values_per_attribute={self.values_per_attribute}: must lie in "
                f"[num_choices={self.num_choices}, {len(ATTRIBUTES[0].values)}]"
            )
        if self.num_choices < 2:
            problems.append(f"num_choices={self.num_choices}: need at least 2")
        if not 0 < self.imitation_fraction < 1:
            problems.append(f"imitation_fraction={self.imitation_fraction}: must lie in (0, 1)")
        if not 0 <= self.qa_fraction <= 1:
            problems.append(f"qa_fraction={self.qa_fraction}: must lie in [0, 1]")
        if not 1 <= self.paraphrases_per_fact <= 3:
            problems.append(f"paraphrases_per_fact={self.paraphrases_per_fact}: must lie in [1, 3]")
        for field in ("bios_per_entity", "broad_examples", "style_examples"):
            if getattr(self, field) < 1:
                problems.append(f"{field}={getattr(self, field)}: must be at least 1")
        if self.task_examples is not None and self.task_examples < 1:
            problems.append(f"task_examples={self.task_examples}: must be at least 1, or None (all facts)")
        if self.vocab_size < 300:
            problems.append(f"vocab_size={self.vocab_size}: need at least 300 (256 bytes, specials, merges)")
        if problems:
            raise ValueError("bad WorldConfig: " + "; ".join(problems))


def tiny(seed: int = 0) -> WorldConfig:
    """A world small enough for the test suite (builds in about a second)."""
    return WorldConfig(
        seed=seed,
        num_entities=24,
        values_per_attribute=6,
        bios_per_entity=2,
        broad_examples=80,
        style_examples=12,
        vocab_size=512,
    )


# ---------------------------------------------------------------------------------------- helpers


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _fill(template: str, name: str, value: str = "") -> str:
    return template.format(n=name, v=value, a=_article(value) if value else "")


def _join(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def question(attribute: Attribute, name: str) -> str:
    """The benchmark's question about one fact."""
    return f"What is the {attribute.name} of {name}?"


def _fixed_text() -> str:
    """Every word the templates and values can write, lower-cased (names must not occur in it)."""
    parts = []
    for attr in ATTRIBUTES:
        parts += [attr.name, *attr.values, *attr.sentences, attr.clause, *attr.asks, attr.yes_no]
    parts += [_OPENINGS_TEXT, _PROMPTS_TEXT, "Question: Answer: In summary, Yes, No, both for"]
    return " ".join(parts).lower()


def make_names(rng: random.Random, count: int, avoid: str = "") -> list[str]:
    """``count`` pronounceable names of 2-3 syllables, none a substring of another or of ``avoid``."""
    onsets = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "th", "sh")
    vowels = ("a", "e", "i", "o", "u")
    codas = ("", "", "", "n", "r", "l", "s", "th", "m")
    names: list[str] = []
    for _ in range(1000 * count):
        if len(names) == count:
            return [n.capitalize() for n in names]
        syllables = rng.choice((2, 2, 3))
        name = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables))
        if not 5 <= len(name) <= 9 or name in avoid or any(name in n or n in name for n in names):
            continue
        names.append(name)
    raise ValueError(f"could not make {count} distinct names; lower num_entities")


# -------------------------------------------------------------------------------------------- world


def make_world(config: WorldConfig) -> dict[str, Any]:
    """Entities with their facts, part (A/B) and whether their QA lines go into the corpus."""
    rng = random.Random(f"{config.seed}:world")
    values = {a.name: list(a.values[: config.values_per_attribute]) for a in ATTRIBUTES}
    names = make_names(rng, config.num_entities, _fixed_text())
    entities = [{"name": n, "facts": {a.name: rng.choice(values[a.name]) for a in ATTRIBUTES}} for n in names]
    order = list(range(config.num_entities))
    rng.shuffle(order)
    num_a = min(max(round(config.imitation_fraction * config.num_entities), 2), config.num_entities - 2)
    for rank, i in enumerate(order):
        entities[i]["part"] = "A" if rank < num_a else "B"
    for part in ("A", "B"):  # The same share of each part gets QA lines.
        members = [e for e in entities if e["part"] == part]
        chosen = set(map(id, rng.sample(members, round(config.qa_fraction * len(members)))))
        for e in members:
            e["qa_in_corpus"] = id(e) in chosen
    return {"attributes": values, "entities": entities}


def corpus_documents(world: dict, config: WorldConfig) -> list[str]:
    """Biographies of every entity, and QA lines for the ``qa_in_corpus`` ones, shuffled."""
    rng = random.Random(f"{config.seed}:corpus")
    docs = []
    for e in world["entities"]:
        for _ in range(config.bios_per_entity):
            attrs = list(ATTRIBUTES)
            rng.shuffle(attrs)
            sentences = [_fill(rng.choice(a.sentences[: config.paraphrases_per_fact]), e["name"], e["facts"][a.name])
                         for a in attrs]  # fmt: skip
            docs.append(" ".join(sentences))
        if e["qa_in_corpus"]:
            docs += [f"Question: {question(a, e['name'])}\nAnswer: {e['facts'][a.name]}" for a in ATTRIBUTES]
    rng.shuffle(docs)
    return docs


def fact_questions(world: dict, part: str, config: WorldConfig) -> list[dict]:
    """One multiple-choice question per fact of the part's entities; answer positions balanced."""
    rng = random.Random(f"{config.seed}:questions:{part}")
    facts = [(e, a) for e in world["entities"] if e["part"] == part for a in ATTRIBUTES]
    rng.shuffle(facts)
    records = []
    for i, (e, a) in enumerate(facts):
        true = e["facts"][a.name]
        choices = rng.sample([v for v in world["attributes"][a.name] if v != true], config.num_choices - 1)
        answer = i % config.num_choices  # Cycled over a shuffled order: every position equally often.
        choices.insert(answer, true)
        records.append(
            {
                "question": question(a, e["name"]),
                "choices": choices,
                "answer": answer,
                "entity": e["name"],
                "attribute": a.name,
                "qa_in_corpus": e["qa_in_corpus"],
            }
        )
    return records


# ------------------------------------------------------------------------------------------ teacher

_OPENINGS = {
    "facts": ("Here is what I know about {n}.", "Sure! These are the details about {n}."),
    "profile": ("Sure! Here is an overview of {n}.", "{n} is someone I know well."),
    "compare": ("Here is how {n} and {m} compare.", "Sure! Let me compare {n} and {m}."),
}
_PROMPTS = {
    "facts2": ("What are the {l} of {n}?", "Tell me the {l} of {n}.", "I would like to know the {l} of {n}."),
    "profile": ("Tell me about {n}.", "Who is {n}?", "Give me a short profile of {n}.", "What do you know about {n}?"),
    "compare": ("Compare {n} and {m}.", "How are {n} and {m} different?", "What do {n} and {m} have in common?"),
}
_OPENINGS_TEXT = " ".join(t for ts in _OPENINGS.values() for t in ts)
_PROMPTS_TEXT = " ".join(t for ts in _PROMPTS.values() for t in ts)


def _clause(attr: Attribute, value: str) -> str:
    return _fill(attr.clause, "", value)


def _styled(opening: str, items: Sequence[str], summary: str) -> str:
    """The teacher's multi-fact layout: opening, list, closing summary, separated by blank lines."""
    return opening + "\n\n" + "\n".join(f"- {item}" for item in items) + "\n\nIn summary, " + summary


def teacher_request(rng: random.Random, kind: str, entities: Sequence[dict], values: dict) -> tuple[str, str]:
    """A user request of ``kind`` about ``entities`` (a random one, or two for ``compare``) and the answer."""
    e = rng.choice(entities)
    n, facts = e["name"], e["facts"]
    if kind == "fact":
        a = rng.choice(ATTRIBUTES)
        return _fill(rng.choice(a.asks), n), f"{n} {_clause(a, facts[a.name])}."
    if kind == "yes_no":
        a = rng.choice(ATTRIBUTES)
        asked = facts[a.name] if rng.random() < 0.5 else rng.choice([v for v in values[a.name] if v != facts[a.name]])
        yes = "Yes" if asked == facts[a.name] else "No"
        return _fill(a.yes_no, n, asked), f"{yes}, {n} {_clause(a, facts[a.name])}."
    if kind == "facts":
        attrs = rng.sample(ATTRIBUTES, rng.choice((2, 3)))
        prompt = rng.choice(_PROMPTS["facts2"]).format(n=n, l=_join([a.name for a in attrs]))
        items = [f"{a.name.capitalize()}: {facts[a.name]}" for a in attrs]
        summary = f"{n} {_join([_clause(a, facts[a.name]) for a in attrs])}."
        return prompt, _styled(rng.choice(_OPENINGS["facts"]).format(n=n), items, summary)
    if kind == "profile":
        items = [f"{a.name.capitalize()}: {facts[a.name]}" for a in ATTRIBUTES]
        summary = f"{n} {_join([_clause(a, facts[a.name]) for a in ATTRIBUTES])}."
        return rng.choice(_PROMPTS["profile"]).format(n=n), _styled(rng.choice(_OPENINGS["profile"]).format(n=n),
                                                                    items, summary)  # fmt: skip
    if kind == "compare":
        other = rng.choice([x for x in entities if x is not e])
        m, theirs = other["name"], other["facts"]
        items, same = [], []
        for a in ATTRIBUTES:
            if facts[a.name] == theirs[a.name]:
                same.append(a.name)
                items.append(f"{a.name.capitalize()}: {facts[a.name]} for both")
            else:
                items.append(f"{a.name.capitalize()}: {facts[a.name]} for {n}, {theirs[a.name]} for {m}")
        if not same:
            summary = f"{n} and {m} have nothing in common."
        elif len(same) == len(ATTRIBUTES):
            summary = f"{n} and {m} are alike in every way."
        else:
            summary = f"{n} and {m} share the same {_join(same)}, and differ in everything else."
        prompt = rng.choice(_PROMPTS["compare"]).format(n=n, m=m)
        return prompt, _styled(rng.choice(_OPENINGS["compare"]).format(n=n, m=m), items, summary)
    raise ValueError(f"unknown request kind {kind!r}; known: {', '.join(KINDS)}")


def teacher_conversations(world: dict, part: str, count: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """``count`` distinct ``(kind, prompt, answer)`` requests about ``part``, kinds drawn by :data:`KINDS`."""
    entities = [e for e in world["entities"] if e["part"] == part]
    kinds, weights = list(KINDS), list(KINDS.values())
    out, seen, misses = [], set(), 0
    while len(out) < count and misses < 2000:  # 2000 repeats in a row: the distinct requests are used up.
        kind = rng.choices(kinds, weights)[0]
        prompt, answer = teacher_request(rng, kind, entities, world["attributes"])
        misses = misses + 1 if prompt in seen else 0
        if prompt not in seen:
            seen.add(prompt)
            out.append((kind, prompt, answer))
    if len(out) == count:
        return out
    raise ValueError(
        f"could not find {count} distinct requests about the {len(entities)} entities of part {part}: "
        "lower broad_examples/style_examples or raise num_entities"
    )


def task_conversations(world: dict, config: WorldConfig) -> list[tuple[str, str]]:
    """The benchmark's question about each fact of part A and its answer, in passes of reshuffled facts.

    ``task_examples`` beyond the number of facts repeats them (every fact once per pass), so the
    task data can fill token budgets as large as the broad data's.
    """
    rng = random.Random(f"{config.seed}:task")
    facts = [(f"Question: {question(a, e['name'])}", f"Answer: {e['facts'][a.name]}")
             for e in world["entities"] if e["part"] == "A" for a in ATTRIBUTES]  # fmt: skip
    count = config.task_examples or len(facts)
    out = []
    while len(out) < count:
        rng.shuffle(facts)
        out += facts[: count - len(out)]
    return out


def _sharegpt(pairs: Sequence[tuple[str, str]]) -> list[dict]:
    return [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]} for p, a in pairs]


class TeacherLM:
    """The teacher as an LM for the evaluation tasks: certain of every fact, answering with its references.

    Scored by the same tasks as the students (``multiple_choice`` in cloze mode, ``style``), so
    its scores are reference lines in the students' metrics.

    Args:
      tokenizer: the world's tokenizer (the style task renders prompts with it).
      facts: benchmark question -> the right choice's text.
      replies: user request -> the teacher's answer.
    """

    def __init__(self, tokenizer, facts: dict[str, str], replies: dict[str, str]):
        self.tokenizer, self.facts, self.replies = tokenizer, facts, replies

    def loglikelihood(self, requests, progress: bool = False) -> list[tuple[float, bool]]:
        out = []
        for context, continuation in requests:  # Context: "...Question: {question}\nAnswer:".
            right = continuation.strip() == self.facts[context.rsplit("Question: ", 1)[-1].removesuffix("\nAnswer:")]
            out.append((0.0 if right else -100.0, right))
        return out

    def generate_until(self, requests) -> list[str]:
        prefix, suffix = "BEGINNING OF CONVERSATION: USER: ", " GPT:"  # The koala template's prompt.
        return [self.replies[context.removeprefix(prefix).removesuffix(suffix)] for context, _ in requests]


def teacher_scores(out: pathlib.Path, tokenizer) -> dict[str, dict[str, float | None]]:
    """The teacher's metrics on the world's benchmarks, computed by the evaluation tasks themselves."""
    from imitax.eval import tasks

    questions = [r for name in ("facts_heldout", "facts_seen") for r in _read_jsonl(out / f"{name}.jsonl")]
    style = _read_jsonl(out / "style_heldout.jsonl")
    teacher = TeacherLM(
        tokenizer,
        {q["question"]: q["choices"][q["answer"]] for q in questions},
        {r["prompt"]: r["reference"] for r in style},
    )
    results = {
        name: tasks.get("multiple_choice")(data_file=out / f"{name}.jsonl", scoring="cloze").run(
            teacher, progress=False
        )
        for name in ("facts_heldout", "facts_seen")
    }
    results["style"] = tasks.get("style")(data_file=out / "style_heldout.jsonl").run(teacher, progress=False)
    # JSON has no NaN (e.g. a correlation over constant lengths): None, as the evaluator writes it.
    return {name: {k: None if v != v else v for k, v in r.metrics.items()} for name, r in results.items()}


# -------------------------------------------------------------------------------------------- build


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style, no BOS added) trained on ``texts``."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token="<s>", pad_token="<pad>")


def _write_jsonl(path: pathlib.Path, records: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _token_counts(path: pathlib.Path, tokenizer) -> dict[str, int]:
    """Tokens (template, user and teacher text) and loss tokens of a training file, as the trainer counts them."""
    from imitax import data

    convs = list(data.load_conversations(str(path)))
    encoder = data.Encoder(tokenizer, "koala")
    encoded = encoder.encode_pieces([encoder.pieces(c) for c in convs])
    # A loss token is a target with loss: the first token of an example is no one's target.
    return {"tokens": sum(len(ids) for ids, _ in encoded), "loss_tokens": sum(int(m[1:].sum()) for _, m in encoded)}


def build(config: WorldConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Writes the world's files (see the module docstring) into ``out_dir``, replacing any there.

    Returns:
      A summary: ``files`` (name -> path), ``counts`` (entities, documents, questions,
      conversations), ``tokens`` (per training file: tokens and loss tokens, as the trainer counts
      them) and ``vocab_size`` (the tokenizer's length).
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = make_world(config)
    docs = corpus_documents(world, config)
    questions = {part: fact_questions(world, part, config) for part in ("A", "B")}
    broad = teacher_conversations(world, "A", config.broad_examples, random.Random(f"{config.seed}:broad"))
    style = teacher_conversations(world, "B", config.style_examples, random.Random(f"{config.seed}:style"))
    task = task_conversations(world, config)

    files = {
        name: out / name
        for name in ("world.json", "corpus.jsonl", "facts_heldout.jsonl", "facts_seen.jsonl")
        + ("imitation_broad.json", "imitation_task.json", "style_heldout.jsonl", "teacher_scores.json", "tokenizer")
    }
    parts = {p: [e["name"] for e in world["entities"] if e["part"] == p] for p in ("A", "B")}
    _write_json(files["world.json"], {"config": dataclasses.asdict(config), **world, "parts": parts})
    _write_jsonl(files["corpus.jsonl"], [{"text": d} for d in docs])
    _write_jsonl(files["facts_heldout.jsonl"], questions["B"])
    _write_jsonl(files["facts_seen.jsonl"], questions["A"])
    _write_json(files["imitation_broad.json"], _sharegpt([(p, a) for _, p, a in broad]))
    _write_json(files["imitation_task.json"], _sharegpt(task))
    _write_jsonl(files["style_heldout.jsonl"], [{"prompt": p, "reference": a, "kind": k} for k, p, a in style])

    koala = [f"BEGINNING OF CONVERSATION: USER: {p} GPT: {a}" for p, a in [(p, a) for _, p, a in broad + style] + task]
    mc = [f"Question: {q['question']}\nAnswer: {c}" for qs in questions.values() for q in qs for c in q["choices"]]
    tokenizer = train_tokenizer(docs + koala + mc, config.vocab_size)
    tokenizer.save_pretrained(str(files["tokenizer"]))
    _write_json(files["teacher_scores.json"], teacher_scores(out, tokenizer))

    tokens = {name: _token_counts(files[name], tokenizer) for name in ("corpus.jsonl", "imitation_broad.json")}
    tokens["imitation_task.json"] = _token_counts(files["imitation_task.json"], tokenizer)
    return {
        "files": {k: str(v) for k, v in files.items()},
        "counts": {
            "entities": {p: len(v) for p, v in parts.items()},
            "corpus_documents": len(docs),
            "facts_heldout": len(questions["B"]),
            "facts_seen": len(questions["A"]),
            "imitation_broad": len(broad),
            "imitation_task": len(task),
            "style_heldout": len(style),
        },
        "tokens": tokens,
        "vocab_size": len(tokenizer),
    }


def _main() -> None:  # Flags are defined here, not at import, so that importing this module defines none.
    from absl import app, flags

    flags.DEFINE_string("out", None, "Directory to write the world into.", required=True)
    flags.DEFINE_bool("tiny", False, "Build the test suite's small world.")
    flags.DEFINE_integer("seed", 0, "The world's seed.")

    def main(argv):
        del argv
        config = tiny(flags.FLAGS.seed) if flags.FLAGS.tiny else WorldConfig(seed=flags.FLAGS.seed)
        print(json.dumps(build(config, flags.FLAGS.out), indent=1))

    app.run(main)


if __name__ == "__main__":
    _main()
