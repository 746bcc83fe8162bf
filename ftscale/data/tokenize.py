"""Render examples to token ids with loss masks: the chat template (or ChatML), assistant-only labels."""

from __future__ import annotations

from dataclasses import dataclass

from ftscale.data.formats import ChatExample, TextExample
from ftscale.data.sources import DataError

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


def count_loss_tokens(labels: list[int]) -> int:
    """Tokens the loss is taken on: the model shifts labels by one, so the first label never counts."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken

    @property
    def loss_tokens(self) -> int:
        return count_loss_tokens(self.labels)


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat(example: ChatExample, tokenizer, train_on: str, where: str) -> TokenizedExample:
    text = _render(tokenizer, example.messages, False)
    # Assistant spans in characters: each assistant turn is what rendering it adds after the generation prompt.
    # This works for any template whose renderings of prefixes are prefixes of the whole (all common ones).
    spans = []
    for i, m in enumerate(example.messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, example.messages[:i], True) if i else ""
        upto = _render(tokenizer, example.messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise DataError(f"{where}: the chat template does not render turns as prefixes; use model.chat_template=chatml")
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on == "all":
        return TokenizedExample(ids, list(ids))
    labels = [
        tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX for tok, (start, _) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return TokenizedExample(ids, labels)


def _text(example: TextExample, tokenizer, train_on: str) -> TokenizedExample:
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"] if example.prompt else []
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        prompt = [tokenizer.bos_token_id] + prompt
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    masked = list(prompt) if train_on == "all" else [IGNORE_INDEX] * len(prompt)
    return TokenizedExample(prompt + completion, masked + completion)


def tokenize_example(example: ChatExample | TextExample, tokenizer, train_on: str, where: str) -> TokenizedExample:
    if isinstance(example, ChatExample):
        return _chat(example, tokenizer, train_on, where)
    return _text(example, tokenizer, train_on)
