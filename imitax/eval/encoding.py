"""How a scoring request becomes tokens: the lm-evaluation-harness's encoding rules, written once.

>>> prefix = resolve_prefix_token_id(tokenizer)
>>> encode_pair(tokenizer, "Question: 2+2=?\nAnswer: ", "4", prefix)   # ([...context ids], [...continuation ids])
>>> rolling_windows(token_ids, prefix, max_length=1024)                  # disjoint perplexity windows

The rules are those of the harness's ``hf`` backend (``lm_eval/api/model.py`` and
``lm_eval/models/huggingface.py``, version 0.4); :mod:`imitax.eval.scoring` runs the
model on what they give, and the perplexity and style tasks count tokens with them.

* Trailing whitespace of a context moves to the front of its continuation. The
  context and ``context + continuation`` are each encoded and the
  continuation's tokens are those of the whole string after the encoded
  context's length.
* BOS (``add_bos_token``, the harness's ``HFLM`` argument with its meaning
  since 0.4.9.2): ``None`` (the default, as the harness's since 0.4.9.2)
  encodes with the tokenizer's default special tokens: a LLaMA tokenizer
  prepends BOS, GPT-2's nothing. ``False`` (the harness's default up to
  0.4.9.1) encodes without special tokens. ``True`` encodes with them and
  prepends BOS where the tokenizer did not (as the tokenizer the harness loads
  with ``add_bos_token=True`` does). In every case a text that already starts
  with the prefix token's text gets no special tokens.
* An empty context becomes the prefix token (``prefix_token_id``: BOS, else
  EOS, whatever ``add_bos_token`` is), unless the continuation (encoded
  without special tokens) itself starts with that token, which then serves as
  the context.
* Rolling log-likelihood (perplexity) splits a document's tokens (encoded as
  above: with ``add_bos_token=None`` a LLaMA document starts with BOS, which is
  then scored after the prefix BOS, as the harness does) into the harness's
  disjoint windows of at most ``max_length`` predictions, the first one
  conditioned on the prefix token and each later one on a full window of
  preceding tokens; every token is predicted exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "check_add_bos_token",
    "encode_pair",
    "encode_requests",
    "resolve_prefix_token_id",
    "rolling_windows",
    "tok_encode",
]


def resolve_prefix_token_id(tokenizer, prefix_token_id: int | None = None) -> int:
    """The token an empty context becomes: ``prefix_token_id``, else BOS, else EOS (as the harness)."""
    for candidate in (prefix_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token: pass prefix_token_id explicitly")


def check_add_bos_token(tokenizer, add_bos_token) -> bool | None:
    """Validates ``add_bos_token`` (``None``, ``True`` or ``False``) against ``tokenizer``; returns it.

    Raises:
      ValueError: it is not a bool or ``None`` (a string such as ``"false"``
        would silently read as true), or it is ``True`` and ``tokenizer`` has
        no BOS token to prepend.
    """
    if add_bos_token is not None and not isinstance(add_bos_token, bool):
        raise ValueError(f"add_bos_token must be None, True or False, got {add_bos_token!r}")
    if add_bos_token and tokenizer is not None and tokenizer.bos_token_id is None:
        raise ValueError(
            "add_bos_token=True, but this tokenizer has no BOS token to prepend: leave add_bos_token unset "
            "(the tokenizer's default) or set it to False (scripts/evaluate.py: --add_bos_token)"
        )
    return add_bos_token


def tok_encode(
    tokenizer,
    texts: Sequence[str],
    prefix_token_id: int,
    add_special_tokens: bool | None = None,
    add_bos_token: bool | None = None,
) -> list[list[int]]:
    """Encodes ``texts`` like the harness's ``tok_encode``, in one batched tokenizer call per setting.

    Args:
      tokenizer: a ``transformers`` tokenizer.
      texts: the strings to encode.
      prefix_token_id: the token whose text, at the start of a string, means the
        string brings its own special tokens (none are added to it).
      add_special_tokens: ``True``/``False`` overrides everything (the harness
        passes ``False`` for an empty context's continuation); ``None``
        follows ``add_bos_token`` and the prefix-text rule.
      add_bos_token: ``None``: the tokenizer's default special tokens (LLaMA's
        BOS; nothing for GPT-2). ``False``: none. ``True``: the tokenizer's
        special tokens, with BOS prepended where the tokenizer did not.

    Returns:
      One list of token ids per text.
    """
    if add_special_tokens is not None:
        flags = [add_special_tokens] * len(texts)
    else:
        prefix_text = tokenizer.decode(prefix_token_id)
        wanted = add_bos_token is not False
        flags = [wanted and not t.startswith(prefix_text) for t in texts]
    # add_bos_token=True: the harness loads its tokenizer with add_bos_token=True, which (transformers'
    # post-processor) prepends BOS to every encoding with special tokens; this tokenizer may not.
    bos = tokenizer.bos_token_id if add_bos_token else None
    out: list[list[int] | None] = [None] * len(texts)
    for flag in (True, False):
        index = [i for i, f in enumerate(flags) if f == flag]
        if index:
            ids = tokenizer([texts[i] for i in index], add_special_tokens=flag)["input_ids"]
            for i, row in zip(index, ids, strict=True):
                row = list(row)
                out[i] = [bos, *row] if flag and bos is not None and row[:1] != [bos] else row
    return out  # type: ignore[return-value]


def encode_pair(
    tokenizer, context: str, continuation: str, prefix_token_id: int, add_bos_token: bool | None = None
) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` of one request, by the harness's rules (module docstring)."""
    return encode_requests(tokenizer, [(context, continuation)], prefix_token_id, add_bos_token)[0]


def encode_requests(
    tokenizer, requests: Sequence[tuple[str, str]], prefix_token_id: int, add_bos_token: bool | None = None
) -> list[tuple[list[int], list[int]]]:
    pairs, whole_texts, context_texts, empty = [], [], [], []
    for context, continuation in requests:
        if context == "":
            empty.append(continuation)
            pairs.append(None)
            continue
        spaces = len(context) - len(context.rstrip())
        if spaces:  # Word-boundary whitespace belongs to the continuation's first token.
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        pairs.append((context, continuation))
        whole_texts.append(context + continuation)
        context_texts.append(context)
    # Contexts repeat across a question's choices: encode each distinct text once.
    distinct = list(dict.fromkeys(whole_texts + context_texts))
    encoded = dict(
        zip(distinct, tok_encode(tokenizer, distinct, prefix_token_id, add_bos_token=add_bos_token), strict=True)
    )
    # The harness encodes an empty context's continuation without special tokens, whatever add_bos_token is.
    empty_ids = iter(tok_encode(tokenizer, empty, prefix_token_id, add_special_tokens=False) if empty else ())
    out = []
    for pair in pairs:
        if pair is None:
            continuation_ids = next(empty_ids)
            if not continuation_ids:
                raise ValueError("a request with an empty context needs a non-empty continuation")
            if continuation_ids[0] != prefix_token_id:
                out.append(([prefix_token_id], continuation_ids))
            else:  # The continuation starts with the prefix token: it is its own context.
                out.append((continuation_ids[:1], continuation_ids[1:]))
            continue
        context, continuation = pair
        whole, context_ids = encoded[context + continuation], encoded[context]
        out.append((context_ids, whole[len(context_ids) :]))
    return out


def rolling_windows(tokens: Sequence[int], prefix_token_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """The harness's disjoint rolling windows (``get_rolling_token_windows`` with ``context_len=1``).

    Returns ``(context, continuation)`` token pairs: the first predicts up to
    ``max_length`` tokens after the prefix token; each later one predicts the
    next ``max_length`` tokens (or the rest) with the tokens before them as
    context, so that ``context + continuation`` spans ``max_length + 1`` tokens
    (or all of the tokens, when there are fewer). Every token is predicted once.
    """
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token_id], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(len(tokens), done + max_length)
        # The harness's window is tokens[end - max_length - 1 : end - 1] predicting tokens[done:end];
        # made disjoint, its context is the part before `done`.
        windows.append((tokens[end - max_length - 1 : done], tokens[done:end]))
        done = end
    return windows
