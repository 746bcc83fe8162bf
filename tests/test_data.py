"""Data pipeline: sources, formats, loss masks, packing without cross-example attention, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ftscale.config.data import DataConfig, DataSource
from ftscale.data import IGNORE_INDEX, DataError, build_datasets, collate, ensure_chat_template, tokenize_sources
from ftscale.data.packing import greedy_rows, packed_row
from ftscale.data.tokenize import TokenizedExample

from conftest import build_tiny_model, build_tokenizer, demo_rows, write_jsonl

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
    ]
}


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    assert ensure_chat_template(t, "auto") == 0  # ChatML tokens already in the vocabulary: nothing added
    return t


def tokenize(tok, rows, tmp_path, fmt="auto", **cfg):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, stats = tokenize_sources([DataSource(path=str(path), format=fmt)], DataConfig(**cfg), tok)
    return examples, stats


def trained_text(tok, ex: TokenizedExample) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


def test_chat_masks_everything_but_assistant_turns(tok, tmp_path):
    two_turns = {"messages": CHAT["messages"] + [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]}
    (ex,), _ = tokenize(tok, [two_turns], tmp_path)
    assert trained_text(tok, ex) == "Hello!<|im_end|>\nNo.<|im_end|>\n"
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_train_on_all(tok, tmp_path):
    (ex,), _ = tokenize(tok, [CHAT], tmp_path, train_on="all")
    assert ex.labels == ex.input_ids


def test_prompt_completion_text(tok, tmp_path):
    (ex,), _ = tokenize(tok, [{"prompt": "2+2=", "completion": " 4"}], tmp_path)
    assert tok.decode(ex.input_ids) == f"2+2= 4{tok.eos_token}"
    assert trained_text(tok, ex) == f" 4{tok.eos_token}"


def test_prompt_completion_conversational(tok, tmp_path):
    row = {"prompt": [{"role": "user", "content": "Hi there"}], "completion": [{"role": "assistant", "content": "Hello!"}]}
    (ex,), _ = tokenize(tok, [row], tmp_path)
    assert trained_text(tok, ex) == "Hello!<|im_end|>\n"


def test_plain_text_trains_on_every_token(tok, tmp_path):
    (ex,), _ = tokenize(tok, [{"text": "Lisbon is in Portugal."}], tmp_path)
    assert trained_text(tok, ex) == f"Lisbon is in Portugal.{tok.eos_token}"


def test_alpaca(tok, tmp_path):
    (ex,), _ = tokenize(tok, [{"instruction": "Translate", "input": "Hallo", "output": "Hello"}], tmp_path)
    assert "<|im_start|>user\nTranslate\n\nHallo<|im_end|>" in tok.decode(ex.input_ids)
    assert trained_text(tok, ex) == "Hello<|im_end|>\n"


def test_chatml_tokens_are_added_when_missing():
    t = build_tokenizer(with_chatml_tokens=False)
    before = len(t)
    assert ensure_chat_template(t, "auto") == 2
    assert len(t) == before + 2 and t.eos_token == "<|im_end|>"


def test_every_source_kind_gives_the_same_examples(tok, tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(5)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "disk"))
    results = []
    for name in ("d.jsonl", "d.json", "d.parquet", "d.csv", "disk"):
        examples, _ = tokenize_sources([DataSource(path=str(tmp_path / name))], DataConfig(), tok)
        results.append([e.input_ids for e in examples])
    assert all(r == results[0] for r in results) and len(results[0]) == 5


def encoded(ex: TokenizedExample) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ex.input_ids), np.asarray(ex.labels) != IGNORE_INDEX


def pack(examples: list[TokenizedExample], max_len: int):
    bounds = greedy_rows(np.array([len(e.input_ids) for e in examples]), max_len)
    return [packed_row([encoded(e) for e in examples[a:b]], packed=True) for a, b in zip(bounds, bounds[1:], strict=False)]


def test_packing_restarts_positions_and_masks_boundaries():
    a = TokenizedExample([5, 6, 7], [5, 6, 7])
    b = TokenizedExample([8, 9], [8, 9])
    c = TokenizedExample([10, 11, 12, 13], [10, 11, 12, 13])
    rows = pack([a, b, c], max_len=6)
    assert [r.input_ids.tolist() for r in rows] == [[5, 6, 7, 8, 9], [10, 11, 12, 13]]
    assert rows[0].position_ids.tolist() == [0, 1, 2, 0, 1]
    assert rows[0].labels.tolist() == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]
    batch = collate(rows, pad_id=0, packed=True)
    assert "attention_mask" not in batch
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0]  # the pad forms a block of its own
    assert batch["labels"][1].tolist()[-1] == IGNORE_INDEX


def test_packed_row_has_no_attention_across_examples(tok, tmp_path):
    """Logits of each example inside a packed row equal the logits of that example run alone."""
    examples, _ = tokenize(tok, demo_rows(4), tmp_path)
    (row,) = pack(examples, max_len=1024)
    model = build_tiny_model(len(tok)).eval()
    with torch.no_grad():
        packed = model(**{k: v for k, v in collate([row], 0, packed=True).items() if k != "labels"}, use_cache=False).logits[0]
        start = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(ex.input_ids)], alone, atol=1e-5, rtol=1e-4)
            start += len(ex.input_ids)
    assert start == len(row.input_ids) and len(examples) == 4


def test_padded_batches_mask_padding(tok, tmp_path):
    source = DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", demo_rows(3))))
    data = build_datasets(DataConfig(train=[source], packing=False, cache_dir=str(tmp_path / "cache")), tok, seed=0)
    rows = [data.train[i] for i in range(len(data.train))]
    batch = collate(rows, tok.pad_token_id, packed=False)
    lengths = [len(r.input_ids) for r in rows]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_overlong_examples_are_truncated_or_dropped_and_counted(tok, tmp_path):
    long = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "word " * 200}]}
    short = {"prompt": "a", "completion": " b"}
    examples, stats = tokenize(tok, [long, short], tmp_path, max_seq_len=64)
    assert stats.truncated == 1 and max(len(e.input_ids) for e in examples) == 64
    examples, stats = tokenize(tok, [long, short], tmp_path, max_seq_len=64, overlong="drop")
    assert stats.dropped == 1 and len(examples) == 1


BAD_ROWS = [
    ('{"messages": [', "d.jsonl:2: not valid JSON"),
    ({"prompt": "only a prompt"}, "d.jsonl:2: cannot tell the row's format from its keys ['prompt']"),
    ({"messages": []}, "d.jsonl:2: empty conversation"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "d.jsonl:2: message 0 has role 'bot'; expected one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "d.jsonl:2: conversation has no assistant message"),
    (
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        "d.jsonl:2: message 0 content must be a string, got int",
    ),
    ({"messages": [{"content": "hi"}]}, "d.jsonl:2: message 0 must be an object with 'role' and 'content'"),
    ({"messages": "hello"}, "d.jsonl:2: 'messages' must be a list"),
    ([1, 2], "d.jsonl:2: a row must be a JSON object, got list"),
    ({"text": "   "}, "d.jsonl:2: field 'text' is empty"),
    ({"instruction": "Do", "input": 5, "output": "x"}, "d.jsonl:2: field 'input' must be a string, got int"),
    ({"prompt": "q", "completion": None}, "d.jsonl:2: missing field 'completion'"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_malformed_row_names_file_and_line(tok, tmp_path, bad, message):
    with pytest.raises(DataError, match="data.on_error=skip") as e:
        tokenize(tok, [CHAT, bad, CHAT], tmp_path)
    assert message in str(e.value)


def test_skip_mode_counts_malformed_rows(tok, tmp_path):
    bad = [b for b, _ in BAD_ROWS]
    examples, stats = tokenize(tok, [CHAT, *bad, CHAT], tmp_path, on_error="skip")
    assert len(examples) == 2 and stats.skipped == len(BAD_ROWS)
    assert "d.jsonl:2" in stats.skipped_where[0]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("d.txt", "hello", "unsupported file type '.txt'"),
        ("d.json", '{"a": 1}', "a .json source must hold a list of row objects"),
        ("d.json", "[{]", "d.json:1: not valid JSON"),
        ("missing.jsonl", None, "missing.jsonl: no such file or folder"),
    ],
)
def test_bad_sources(tok, tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        tokenize_sources([DataSource(path=str(tmp_path / name))], DataConfig(), tok)


def test_missing_split_and_empty_dataset(tok, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])}).save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(DataError, match="has no split 'test' \\(it has train\\)"):
        tokenize_sources([DataSource(path=str(tmp_path / "disk"), split="test")], DataConfig(), tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="the training data has no usable example after reading .*empty.jsonl: 0 usable examples") as e:
        build_datasets(DataConfig(train=[DataSource(path=str(tmp_path / "empty.jsonl"))], cache_dir=str(tmp_path / "cache")), tok, seed=0)
    assert "DataStats(" not in str(e.value)
