"""Render examples to token ids with loss masks: the chat template (or ChatML), assistant-only labels.

Examples are encoded in batches: one chat-template call per batch and kind of rendering, one batched call of the
fast tokenizer, and loss masks computed with numpy from the offsets, rather than one example at a time with a
Python test per token (`bench/data_pipeline.py` measures the gain per core)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from jinja2.exceptions import TemplateError

from ftscale.data.formats import ChatExample, TextExample
from ftscale.data.sources import DataError
from ftscale.errors import first_line

IGNORE_INDEX = -100

# ChatML, as TRL's setup_chat_format installs it for base models that have no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer, mode: str) -> int:
    """Give the tokenizer a chat template per `model.chat_template`; return how many tokens were added to the
    vocabulary (the caller must then resize the model's embeddings)."""
    if mode == "tokenizer" and not tokenizer.chat_template:
        raise DataError("model.chat_template=tokenizer but the tokenizer has no chat template: use auto or chatml")
    if mode == "tokenizer" or (mode == "auto" and tokenizer.chat_template):
        return 0
    tokenizer.chat_template = CHATML_TEMPLATE
    added = tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    return added


def ensure_pad_token(tokenizer) -> None:
    """Batches are padded: a tokenizer without a pad token pads with end-of-sequence (padding takes no loss)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def count_loss_tokens(labels) -> int:
    """Tokens the loss is taken on (labels: a list or an array): the model shifts labels by one, so the first label
    never counts."""
    return int(np.count_nonzero(np.asarray(labels)[1:] != IGNORE_INDEX))


class Encoded(NamedTuple):
    """One example as the token store holds it: ids, and which of them carry loss (labels are the ids there)."""

    ids: np.ndarray  # int64
    loss_mask: np.ndarray  # bool

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask[1:].sum())  # as count_loss_tokens: the first label never counts


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken

    @property
    def loss_tokens(self) -> int:
        return count_loss_tokens(self.labels)

    @classmethod
    def from_encoded(cls, enc: Encoded) -> TokenizedExample:
        return cls(enc.ids.tolist(), np.where(enc.loss_mask, enc.ids, IGNORE_INDEX).tolist())


def _render(tokenizer, conversations: list[list[dict]], generation_prompt: bool, wheres: list[str]) -> list[str | DataError]:
    """Each conversation rendered by the chat template, in one call; a conversation the template refuses (its
    `raise_exception`, e.g. roles that do not alternate) becomes that row's error."""
    if not conversations:
        return []
    try:
        return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError:
        pass
    out: list[str | DataError] = []
    for messages, where in zip(conversations, wheres, strict=True):
        try:
            out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))
        except TemplateError as e:
            out.append(DataError(f"{where}: the chat template refuses this conversation ({first_line(e)})"))
    return out


def _assistant_spans(tokenizer, chats: list[ChatExample], wheres: list[str]) -> tuple[list[str | DataError], list[list[tuple[int, int]]]]:
    """Each chat's text and its assistant turns as character spans. A turn is what rendering it adds after the
    generation prompt; this works for any template whose renderings of prefixes are prefixes of the whole (all
    common ones), and is checked."""
    texts = _render(tokenizer, [c.messages for c in chats], False, wheres)
    turns = [(j, i) for j, c in enumerate(chats) for i, m in enumerate(c.messages) if m["role"] == "assistant"]
    with_prompt = [(j, i) for j, i in turns if i]
    befores = dict(
        zip(
            with_prompt,
            _render(tokenizer, [chats[j].messages[:i] for j, i in with_prompt], True, [wheres[j] for j, _ in with_prompt]),
            strict=True,
        )
    )
    # A conversation's last turn renders as the whole text: only the earlier turns need a rendering of their own.
    inner = [(j, i) for j, i in turns if i + 1 < len(chats[j].messages)]
    uptos = dict(
        zip(inner, _render(tokenizer, [chats[j].messages[: i + 1] for j, i in inner], False, [wheres[j] for j, _ in inner]), strict=True)
    )
    spans: list[list[tuple[int, int]]] = [[] for _ in chats]
    for j, i in turns:
        text, before = texts[j], befores.get((j, i), "")
        upto = uptos.get((j, i), text)
        if isinstance(text, DataError):
            continue
        for part in (before, upto):
            if isinstance(part, DataError):
                texts[j] = part
                break
        else:
            if not (text.startswith(upto) and upto.startswith(before)):
                texts[j] = DataError(f"{wheres[j]}: the chat template does not render turns as prefixes; use model.chat_template=chatml")
            else:
                spans[j].append((len(before), len(upto)))
    return texts, spans


def _encode_chats(tokenizer, chats: list[ChatExample], train_on: str, wheres: list[str]) -> list[Encoded | DataError]:
    texts, spans = _assistant_spans(tokenizer, chats, wheres)
    good = [j for j, t in enumerate(texts) if isinstance(t, str)]
    enc = tokenizer([texts[j] for j in good], add_special_tokens=False, return_offsets_mapping=True) if good else None
    out: list[Encoded | DataError] = list(texts)  # the errors stay; the texts are replaced below
    for n, j in enumerate(good):
        ids = np.asarray(enc["input_ids"][n], dtype=np.int64)
        if train_on == "all":
            out[j] = Encoded(ids, np.ones(len(ids), dtype=bool))
            continue
        starts = np.fromiter((s for s, _ in enc["offset_mapping"][n]), dtype=np.int64, count=len(ids))
        bounds = np.asarray(spans[j], dtype=np.int64).reshape(-1, 2)
        # The span a token starts in, if any: the last span starting at or before it, when the token starts before its end.
        k = np.searchsorted(bounds[:, 0], starts, side="right") - 1
        out[j] = Encoded(ids, (k >= 0) & (starts < bounds[np.maximum(k, 0), 1]) if len(bounds) else np.zeros(len(ids), dtype=bool))
    return out


def _encode_texts(tokenizer, examples: list[TextExample], train_on: str) -> list[Encoded]:
    if not examples:
        return []
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False) else []
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt = bos + prompt
        ids = np.asarray(prompt + completion + [tokenizer.eos_token_id], dtype=np.int64)
        mask = np.ones(len(ids), dtype=bool)
        if train_on != "all":
            mask[: len(prompt)] = False
        out.append(Encoded(ids, mask))
    return out


def encode_examples(examples: list[ChatExample | TextExample], tokenizer, train_on: str, wheres: list[str]) -> list[Encoded | DataError]:
    """Each example encoded, in order; an example that cannot be encoded becomes its DataError (the caller raises
    or skips it per data.on_error)."""
    chats = [k for k, e in enumerate(examples) if isinstance(e, ChatExample)]
    texts = [k for k, e in enumerate(examples) if not isinstance(e, ChatExample)]
    out: list[Encoded | DataError] = [None] * len(examples)  # type: ignore[list-item]
    for k, enc in zip(chats, _encode_chats(tokenizer, [examples[k] for k in chats], train_on, [wheres[k] for k in chats]), strict=True):
        out[k] = enc
    for k, enc in zip(texts, _encode_texts(tokenizer, [examples[k] for k in texts], train_on), strict=True):
        out[k] = enc
    return out
