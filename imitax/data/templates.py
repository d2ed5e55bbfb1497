r"""Turn formats: a :class:`Conversation` -> token ids and a loss mask.

Templates (``template=``). ``{eos}`` is the tokenizer's EOS token; user, teacher and system texts
are stripped of surrounding whitespace. The loss mask is 1 exactly on the teacher's tokens and the
end-of-turn token after them, 0 everywhere else (system text, user turns, role labels).

``koala`` (default; the study's format)::

    BEGINNING OF CONVERSATION:[ {system}] USER: {user_1} GPT: {teacher_1}{eos} USER: {user_2} GPT: {teacher_2}{eos}

  That is ``BEGINNING OF CONVERSATION:``; the system text after one space, if any; then `` USER:
  {user}`` for each user turn and `` GPT: {teacher}{eos}`` for each teacher turn (a label, one
  space, the text). Loss on `` {teacher}`` (with its leading space) and ``{eos}``.

``vicuna`` (FastChat's ``vicuna_v1.1``)::

    {system} USER: {user_1} ASSISTANT: {teacher_1}{eos}USER: {user_2} ASSISTANT: {teacher_2}{eos}

  ``{system}`` defaults to :data:`VICUNA_SYSTEM`. A label follows text after one space and follows
  ``{eos}`` directly. Loss on `` {teacher}`` and ``{eos}``.

``chatml``::

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user_1}<|im_end|>\n<|im_start|>assistant\n{teacher_1}<|im_end|>\n

  (the system block only with a system text). ``<|im_start|>`` and ``<|im_end|>`` must be tokens of
  the tokenizer. Loss on ``{teacher}`` and its ``<|im_end|>``, not on the newline after it.

``chat_template``: the tokenizer's own template (``apply_chat_template``; user -> ``user``, teacher
  -> ``assistant``). Teacher turn ``i``'s loss span runs from the end of ``render(messages[:i],
  add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])`` less trailing
  whitespace, so it holds the teacher text and the template's end-of-turn token. The template must
  render each conversation as an extension of its prefixes (checked), and needs a user or system
  turn before the first teacher turn.

Documents (``format='text'``) use no template: ``{text}{eos}``, all with loss.

Except with ``chat_template`` (which writes its own), an example starts with the special tokens
the tokenizer puts before any text it encodes (``<s>`` for LLaMA, nothing for GPT-2), without loss.

Tokenization. A template yields pieces (a text or a special-token id, each with or without loss).
Adjacent texts with the same loss are joined into one chunk, each chunk is tokenized on its own
(``add_special_tokens=False``) and the ids are concatenated, so every mask boundary falls between
two tokens. (Tokenizing the whole string instead could produce a token that straddles a boundary,
which no mask can split.) Texts are tokenized with ``split_special_tokens=True``: an answer that
quotes ``</s>`` keeps it as text, never as an EOS. With ``chat_template`` the template's own markers
are text, so this protection is off there.

Segment-wise and whole-string tokenization agree for byte-level BPE tokenizers (GPT-2, NeoX,
LLaMA-3) on the koala, vicuna and chatml templates: chunks meet at a special token, before the space
that precedes a (stripped) teacher text, or after chatml's newline, all places where the
pre-tokenizer splits anyway (tested). They would differ if a boundary fell inside a word or a run of
spaces, which these templates avoid. Tokenizers that write a space before every text they encode
(SentencePiece style, e.g. LLaMA-1/2; detected by ``encode('a') + encode('b') == encode('a b')``)
get each chunk with one leading space removed, since they restore it; a chunk with no leading space
in the template (vicuna's ``{eos}USER:``, chatml's ``assistant\n{teacher}``) still gets that space
from the tokenizer, where a whole-string encoding would not. The study's EasyLM code did the same:
its ``TextProcessor`` tokenized each field separately with the LLaMA tokenizer and appended the EOS
id with loss 1.
"""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np

from imitax.data.formats import USER, Conversation, DataError

TEMPLATES = ("koala", "vicuna", "chatml", "chat_template")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
Piece = tuple[str | int, int]  # (text or special-token id, loss 0/1)


def _sp(text: str) -> str:
    return " " + text if text else ""


def _koala(conv: Conversation, eos: int, prompt: bool) -> list[Piece]:
    pieces: list[Piece] = [("BEGINNING OF CONVERSATION:", 0)]
    if conv.system and conv.system.strip():
        pieces.append((" " + conv.system.strip(), 0))
    for role, text in conv.turns:
        if role == USER:
            pieces.append((" USER:" + _sp(text.strip()), 0))
        else:
            pieces += [(" GPT:", 0), (_sp(text.strip()), 1), (eos, 1)]
    if prompt:
        pieces.append((" GPT:", 0))
    return pieces


def _vicuna(conv: Conversation, eos: int, prompt: bool) -> list[Piece]:
    system = VICUNA_SYSTEM if conv.system is None else conv.system.strip()
    pieces: list[Piece] = [(system, 0)] if system else []

    def label(name: str) -> Piece:  # One space after text; nothing at the start or after {eos}.
        return (" " + name if pieces and isinstance(pieces[-1][0], str) else name, 0)

    for role, text in conv.turns:
        if role == USER:
            pieces += [label("USER:"), (_sp(text.strip()), 0)]
        else:
            pieces += [label("ASSISTANT:"), (_sp(text.strip()), 1), (eos, 1)]
    if prompt:
        pieces.append(label("ASSISTANT:"))
    return pieces


def _chatml(conv: Conversation, start: int, end: int, prompt: bool) -> list[Piece]:
    pieces: list[Piece] = []
    blocks = [("system", conv.system)] if conv.system and conv.system.strip() else []
    blocks += [("user" if role == USER else "assistant", text) for role, text in conv.turns]
    for role, text in blocks:
        loss = int(role == "assistant")
        pieces += [(start, 0), (role + "\n", 0), (text.strip(), loss), (end, loss), ("\n", 0)]
    if prompt:
        pieces += [(start, 0), ("assistant\n", 0)]
    return pieces


def _special_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"template 'chatml' needs the token {token!r}, which the tokenizer lacks: add it with "
            "tokenizer.add_special_tokens (and grow the model's embeddings), or pick another template"
        )
    return token_id


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bos_prefix(tokenizer) -> list[int]:
    """The special tokens ``tokenizer`` puts before any text it encodes (e.g. ``[<s>]``, or ``[]``)."""
    plain, full = _encode(tokenizer, "a"), tokenizer("a")["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    return []


def adds_leading_space(tokenizer) -> bool:
    """Whether ``tokenizer`` writes a space before each text it encodes (SentencePiece style)."""
    return _encode(tokenizer, "a") + _encode(tokenizer, "b") == _encode(tokenizer, "a b")


def tokenizer_hash(tokenizer) -> str:
    """SHA-256 of what decides how ``tokenizer`` encodes: its serialized JSON and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = {
        "tokenizer": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


class Encoder:
    """Encodes conversations for one (tokenizer, template) pair; see the module docstring.

    Args:
      tokenizer: a ``transformers`` tokenizer (``PreTrainedTokenizerFast``/``TokenizersBackend``).
      template: one of :data:`TEMPLATES`.
    """

    def __init__(self, tokenizer, template: str = "koala"):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r} (expected one of {TEMPLATES})")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token, which every template needs")
        if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat_template' needs a tokenizer with a chat_template")
        self.tokenizer, self.template, self.eos = tokenizer, template, tokenizer.eos_token_id
        self.bos = [(token, 0) for token in bos_prefix(tokenizer)]
        self.strip_space = adds_leading_space(tokenizer)
        if template == "chatml":
            self.im_start, self.im_end = _special_id(tokenizer, "<|im_start|>"), _special_id(tokenizer, "<|im_end|>")

    def pieces(self, conv: Conversation, prompt: bool = False) -> list[Piece]:
        """The template's pieces for ``conv`` (with ``prompt``: its user turns, then the teacher label).

        Raises:
          DataError: the conversation cannot be rendered (``chat_template`` mode).
        """
        if conv.document:
            return [*self.bos, (conv.turns[0][1], 1), (self.eos, 1)]
        if self.template == "koala":
            return [*self.bos, *_koala(conv, self.eos, prompt)]
        if self.template == "vicuna":
            return [*self.bos, *_vicuna(conv, self.eos, prompt)]
        if self.template == "chatml":
            return [*self.bos, *_chatml(conv, self.im_start, self.im_end, prompt)]
        try:  # The chat template writes its own BOS.
            return self._chat_template(conv, prompt)
        except Exception as e:  # Jinja raises many types; the record's location is what helps.
            raise DataError(conv.where or "conversation", f"chat template: {e}") from e

    def _chat_template(self, conv: Conversation, prompt: bool) -> list[Piece]:
        system = conv.system.strip() if conv.system else ""
        messages = [{"role": "system", "content": system}] if system else []
        first = len(messages)
        messages += [{"role": "user" if r == USER else "assistant", "content": t.strip()} for r, t in conv.turns]

        def render(msgs, generation_prompt=False):
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

        full = render(messages, prompt)
        if prompt:
            return [(full, 0)]
        pieces, pos = [], 0
        for i in range(first, len(messages)):
            if messages[i]["role"] != "assistant":
                continue
            if i == 0:
                raise ValueError("needs a user or system turn before the first teacher turn")
            before, upto = render(messages[:i], True), render(messages[: i + 1])
            start, end = len(before), len(upto.rstrip())
            if not (upto.startswith(before) and full.startswith(upto) and pos <= start <= end):
                raise ValueError("the template does not render a conversation as an extension of its prefixes")
            pieces += [(full[pos:start], 0), (full[start:end], 1)]
            pos = end
        return [*pieces, (full[pos:], 0)]

    def _chunks(self, pieces: list[Piece]) -> list[Piece]:
        """Joins adjacent texts with the same loss; drops empty ones."""
        chunks: list[Piece] = []
        for piece, loss in pieces:
            if isinstance(piece, str) and chunks and isinstance(chunks[-1][0], str) and chunks[-1][1] == loss:
                chunks[-1] = (chunks[-1][0] + piece, loss)
            elif piece != "":
                chunks.append((piece, loss))
        if self.strip_space:
            chunks = [(p[1:] if isinstance(p, str) and p.startswith(" ") else p, loss) for p, loss in chunks]
        return [(p, loss) for p, loss in chunks if p != ""]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text: no added special tokens; special-token text parsed only for chat_template."""
        split = self.template != "chat_template"
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=split)["input_ids"]
        # The Rust call the transformers wrapper makes, without its per-text Python conversion
        # (with the numpy assembly below, a third less time per token than tokenizer(texts)).
        previous, backend.encode_special_tokens = backend.encode_special_tokens, split
        try:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = previous

    def encode_pieces(self, examples: list[list[Piece]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tokenizes many examples' pieces in one batched tokenizer call: ``[(ids uint32, mask uint8)]``."""
        chunked = [self._chunks(p) for p in examples]
        texts = [p for chunks in chunked for p, _ in chunks if isinstance(p, str)]
        encoded = iter(self._tokenize(texts) if texts else ())
        out = []
        for chunks in chunked:
            tokens = [[p] if isinstance(p, int) else next(encoded) for p, _ in chunks]
            losses = [loss for _, loss in chunks]
            ids = np.fromiter(itertools.chain.from_iterable(tokens), np.uint32)
            out.append((ids, np.repeat(np.array(losses, np.uint8), [len(t) for t in tokens])))
        return out

    def encode(self, conv: Conversation) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_pieces([self.pieces(conv)])[0]

    def encode_prompt(self, conv: Conversation) -> np.ndarray:
        """Token ids that ask for the next teacher turn: ``conv`` then the teacher's label (``' GPT:'``)."""
        return self.encode_pieces([self.pieces(conv, prompt=True)])[0][0]

    def render(self, conv: Conversation, prompt: bool = False) -> str:
        """The template's text for ``conv`` (special tokens written as their strings)."""
        pieces = self.pieces(conv, prompt)
        return "".join(p if isinstance(p, str) else self.tokenizer.convert_ids_to_tokens(p) for p, _ in pieces)


def encode_conversation(conv: Conversation, tokenizer, template: str = "koala") -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` of one conversation: uint32 token ids and a uint8 loss mask of the same length."""
    return Encoder(tokenizer, template).encode(conv)


def encode_prompt(conv: Conversation, tokenizer, template: str = "koala") -> np.ndarray:
    """Token ids of a generation prompt in the training format (for evaluation against the teacher)."""
    return Encoder(tokenizer, template).encode_prompt(conv)


def render(conv: Conversation, tokenizer, template: str = "koala", prompt: bool = False) -> str:
    """The text a template makes of ``conv``, before tokenization."""
    return Encoder(tokenizer, template).render(conv, prompt)
