"""Token stores: the same tokens as the in-memory pipeline, content-addressed keys, one build under races, kills and
damage, worker errors with file:line, ranks that wait for a builder, packing, mixing and padding-free batches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import PreTrainedTokenizerFast

from ftscale.config.data import DataConfig, DataSource
from ftscale.data import IGNORE_INDEX, DataError, build_datasets, collate, ensure_chat_template, tokenize_sources
from ftscale.data.mixing import mix, quotas
from ftscale.data.packing import best_fit_rows, greedy_rows
from ftscale.data.store_build import CHUNK_ROWS, ensure_store, request_for
from ftscale.data.store_ranks import build_once
from ftscale.data.token_store import TokenStore, store_problem

from conftest import REPO, build_tiny_model, build_tokenizer, demo_rows, tiny_overrides, write_jsonl
from helpers import adapter, assert_same_adapter, free_port, train_cmd, train_losses

CHAT = {
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
}


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    ensure_chat_template(t, "auto")
    return t


def settings(tmp_path, **kw) -> DataConfig:
    return DataConfig(**{"cache_dir": str(tmp_path / "cache"), **kw})


def store_for(source: DataSource, cfg: DataConfig, tok) -> TokenStore:
    request = request_for(source, cfg, tok)
    ensure_store(request, cfg, tok)
    return TokenStore(request.folder)


def many_rows(n: int) -> list[dict]:
    """n chat rows of varied length (the demo rows, repeated with their turns doubled now and then)."""
    base = demo_rows(400)
    rows = []
    for i in range(n):
        row = base[i % len(base)]
        rows.append({"messages": row["messages"] * (1 + i % 3)})
    return rows


# ---- the same tokens as in memory --------------------------------------------------------------------------------
FORMATS = {
    "messages": CHAT,
    "prompt_completion": {"prompt": "2+2=", "completion": " 4"},
    "conversational": {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]},
    "alpaca": {"instruction": "Translate", "input": "Hallo", "output": "Hello"},
    "text": {"text": "Lisbon is in Portugal."},
}


def reference_example(row: dict, tok, train_on: str, max_len: int) -> tuple[list[int], list[int]] | None:
    """What ftscale's pipeline made of one row before the token store (one example at a time, labels by
    character spans), kept here as the yardstick: (ids, labels) after truncation, None when no token has loss."""
    if "messages" in row or isinstance(row.get("prompt"), list) or "instruction" in row:
        if "messages" in row:
            messages = row["messages"]
        elif "instruction" in row:
            user = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        else:
            messages = row["prompt"] + row["completion"]
        text = tok.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
                spans.append((len(before), len(tok.apply_chat_template(messages[: i + 1], tokenize=False))))
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [
            t if train_on == "all" or any(a <= s < b for a, b in spans) else IGNORE_INDEX
            for t, (s, _) in zip(ids, enc["offset_mapping"], strict=True)
        ]
    else:
        prompt = tok(row.get("prompt", ""), add_special_tokens=False)["input_ids"]
        completion = tok(row["completion"] if "completion" in row else row["text"], add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id
        ]
        ids = prompt + completion
        labels = (prompt if train_on == "all" else [IGNORE_INDEX] * len(prompt)) + completion
    ids, labels = ids[:max_len], labels[:max_len]
    return (ids, labels) if any(label != IGNORE_INDEX for label in labels[1:]) else None


LONG_CHAT = {
    "messages": [
        {"role": "user", "content": "Tell me about Maria."},
        {"role": "assistant", "content": "Maria is a pilot. " * 3},
        {"role": "user", "content": "And John?"},
        {"role": "assistant", "content": "John is an architect in Lyon. " * 6},
    ]
}


@pytest.mark.parametrize("kind", ["d.jsonl", "d.json", "d.parquet", "d.csv", "disk"])
@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_the_store_holds_exactly_what_the_per_example_pipeline_made(tok, tmp_path, kind, train_on):
    import datasets

    if kind in ("d.jsonl", "d.json"):  # every format in one file, chunked together, and examples cut by max_seq_len
        rows = [FORMATS[f] for f in FORMATS for _ in range(2)] + [LONG_CHAT, {"text": "word " * 300}] + demo_rows(20)
    elif kind == "d.csv":  # a flat table: prompt/completion
        rows = [FORMATS["prompt_completion"], {"prompt": "q" * 400, "completion": " a"}, {"prompt": "q", "completion": " a" * 200}] + [
            {"prompt": f"q{i}", "completion": f" a{i}"} for i in range(5)
        ]
    else:  # Arrow tables hold chat turns as lists of structs
        rows = [LONG_CHAT, CHAT] + demo_rows(20)
    if kind == "d.jsonl":
        write_jsonl(tmp_path / kind, rows)
    elif kind == "d.json":
        (tmp_path / kind).write_text(json.dumps(rows))
    elif kind == "d.parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / kind))
    elif kind == "d.csv":
        datasets.Dataset.from_list(rows).to_csv(str(tmp_path / kind), index=False)
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / kind))
    cfg = settings(tmp_path, max_seq_len=64, train_on=train_on)
    expected = [e for e in (reference_example(r, tok, train_on, 64) for r in rows) if e is not None]
    assert any(len(ids) == 64 for ids, _ in expected)  # truncation is exercised
    source = DataSource(path=str(tmp_path / kind))
    store = store_for(source, cfg, tok)
    assert len(store) == len(expected) == store.stats["examples"]
    for i, (ids, labels) in enumerate(expected):
        enc = store.encoded(i)
        assert enc.ids.tolist() == ids, i
        assert np.where(enc.loss_mask, enc.ids, IGNORE_INDEX).tolist() == labels, i
        assert int(store.loss_tokens[i]) == sum(label != IGNORE_INDEX for label in labels[1:])
    in_memory, _ = tokenize_sources([source], cfg, tok)  # ftscale compare's path
    assert [(e.input_ids, e.labels) for e in in_memory] == expected


def test_chunks_tokenized_by_workers_equal_those_tokenized_in_process(tok, tmp_path):
    rows = many_rows(2 * CHUNK_ROWS + 100)
    source = DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", rows)))
    in_process = store_for(source, settings(tmp_path, num_workers=0), tok)
    workers = store_for(source, settings(tmp_path / "w", num_workers=2), tok)
    assert in_process.manifest["files"] == workers.manifest["files"]  # byte-identical arrays
    assert len(workers) == len(rows)


# ---- keys --------------------------------------------------------------------------------------------------------
def test_any_change_of_input_tokenizer_template_or_option_makes_a_new_store(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", demo_rows(6))
    source, cfg = DataSource(path=str(path)), settings(tmp_path)
    key = request_for(source, cfg, tok).key
    assert request_for(source, cfg, tok).key == key  # stable
    # Options that only regroup examples reuse the store.
    for same in ({"packing": False}, {"packer": "greedy"}, {"eval_fraction": 0.5}, {"padding_free": True}, {"num_workers": 1}):
        assert request_for(source, settings(tmp_path, **same), tok).key == key, same
    changed = [
        request_for(source, settings(tmp_path, **option), tok).key
        for option in ({"max_seq_len": 100}, {"overlong": "drop"}, {"train_on": "all"}, {"on_error": "skip"})
    ]
    changed.append(request_for(DataSource(path=str(path), format="messages"), cfg, tok).key)
    templated = build_tokenizer()
    templated.chat_template = tok.chat_template.replace("\\n", "\\n\\n")
    changed.append(request_for(source, cfg, templated).key)
    grown = build_tokenizer()
    ensure_chat_template(grown, "auto")
    grown.add_tokens(["zebra"])
    changed.append(request_for(source, cfg, grown).key)
    before = path.read_bytes()
    path.write_bytes(before.replace(b"Maria", b"Mario", 1))  # same size, other bytes
    changed.append(request_for(source, cfg, tok).key)
    path.write_bytes(before)
    os.utime(path, ns=(1, 1))  # same bytes, other modification time
    changed.append(request_for(source, cfg, tok).key)
    assert len(set(changed)) == len(changed) and key not in changed


def test_a_large_file_is_keyed_by_sampled_blocks(tmp_path, monkeypatch):
    from ftscale.data import fingerprint

    monkeypatch.setattr(fingerprint, "FULL_HASH_LIMIT", 1 << 16)
    monkeypatch.setattr(fingerprint, "BLOCK", 1 << 10)
    path = tmp_path / "big.bin"
    data = bytearray(os.urandom(1 << 20))
    path.write_bytes(data)
    first = fingerprint.file_identity(path)
    assert "sampled_sha256" in first
    data[-1] ^= 1  # the last block is always sampled
    path.write_bytes(data)
    os.utime(path, ns=(first["mtime_ns"], first["mtime_ns"]))
    assert fingerprint.file_identity(path)["sampled_sha256"] != first["sampled_sha256"]


# ---- damage, kills and races -------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing"])
def test_a_truncated_or_tampered_store_is_rebuilt_never_read(tok, tmp_path, damage):
    source, cfg = DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", demo_rows(20)))), settings(tmp_path)
    request = request_for(source, cfg, tok)
    assert ensure_store(request, cfg, tok) is True
    good = (request.folder / "tokens.bin").read_bytes()
    tokens = request.folder / "tokens.bin"
    if damage == "truncate":
        tokens.write_bytes(good[:-4])
    elif damage == "flip":
        tokens.write_bytes(good[:8] + bytes([good[8] ^ 1]) + good[9:])
    elif damage == "manifest":
        (request.folder / "manifest.json").write_text("{")
    else:
        (request.folder / "loss_mask.bin").unlink()
    assert store_problem(request.folder, request.key) is not None
    assert ensure_store(request, cfg, tok) is True  # built again
    assert store_problem(request.folder, request.key) is None
    assert tokens.read_bytes() == good
    assert ensure_store(request, cfg, tok) is False  # and now used as it is


def test_an_unchanged_store_is_not_hashed_again_and_a_rewritten_one_is(tok, tmp_path, monkeypatch):
    from ftscale.data import token_store

    source, cfg = DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", demo_rows(20)))), settings(tmp_path)
    request = request_for(source, cfg, tok)
    assert ensure_store(request, cfg, tok) is True
    hashed = []
    real = token_store._sha256
    monkeypatch.setattr(token_store, "_sha256", lambda path: hashed.append(path.name) or real(path))
    assert ensure_store(request, cfg, tok) is False and hashed == []  # the build recorded its own checksums
    tokens = request.folder / "tokens.bin"
    good = tokens.read_bytes()
    tokens.write_bytes(good)  # same bytes, a new modification time: checked in full, found intact
    assert ensure_store(request, cfg, tok) is False and sorted(hashed) == sorted(token_store.ARRAYS)
    hashed.clear()
    assert ensure_store(request, cfg, tok) is False and hashed == []
    tokens.write_bytes(good[:8] + bytes([good[8] ^ 1]) + good[9:])
    assert ensure_store(request, cfg, tok) is True and tokens.read_bytes() == good  # rewritten: caught and rebuilt


def test_a_killed_build_leaves_no_readable_store_and_the_next_build_cleans_up(tok, tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "big.jsonl", many_rows(40 * CHUNK_ROWS))
    cfg = [f"model.path={tiny_model_dir}", f"data.train=[{{path: {path}}}]", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"]
    proc = subprocess.Popen([sys.executable, "-m", "ftscale.cli", "preprocess", *cfg], cwd=REPO, stderr=subprocess.PIPE, text=True)
    cache = tmp_path / "cache"
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in cache.glob("*.partial-*/tokens.bin")):
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (partial,) = cache.glob("big-*.partial-*")
    assert not [p for p in cache.glob("big-*") if p.is_dir() and ".partial-" not in p.name]  # nothing under the store's name
    assert store_problem(partial, partial.name.split("-")[1].split(".")[0]) == "no manifest: its build did not finish"
    # The next build removes the leftover and builds the store whole.
    small = write_jsonl(tmp_path / "big.jsonl", demo_rows(30))  # same name, so the same leftover pattern
    request = request_for(DataSource(path=str(small)), DataConfig(cache_dir=str(cache)), tok)
    stale = cache / f"{request.folder.name}.partial-{socket.gethostname()}-0123456789ab"  # this host's: dead
    partial.rename(stale)
    alive = cache / f"{request.folder.name}.partial-another-host-0123456789ab"  # another host's, written just now
    alive.mkdir()
    assert ensure_store(request, DataConfig(cache_dir=str(cache)), tok)
    assert not stale.exists() and store_problem(request.folder, request.key) is None
    assert alive.exists()  # where the lock may not span hosts, another host's fresh build is not a leftover


def test_two_runs_racing_on_one_cache_build_one_store_and_both_train_on_it(tiny_model_dir, tmp_path):
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", many_rows(3 * CHUNK_ROWS)),
        "eval": write_jsonl(tmp_path / "eval.jsonl", demo_rows(8, "eval")),
    }
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            train_cmd(tiny_model_dir, data, tmp_path / f"run{i}", **{"data.cache_dir": cache, "training.max_steps": 2}),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        logs.append(err)
    built = [log.count("built token store") for log in logs]
    assert sorted(built) == [0, 2]  # one run built the train and eval stores; the other waited on the lock, then used them
    assert sum(log.count(": ready (") for log in logs) == 2
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    for i in range(2):
        assert json.loads((tmp_path / f"run{i}/summary.json").read_text())["steps"] == 2


# ---- errors inside workers ---------------------------------------------------------------------------------------
def test_a_bad_row_in_a_worker_names_its_file_and_line_and_leaves_no_store(tok, tmp_path):
    rows = [{"prompt": f"q{i}", "completion": " a"} for i in range(3 * CHUNK_ROWS)]
    rows[2 * CHUNK_ROWS + 7] = '{"messages": ['  # in the third chunk: tokenized by a worker process
    source, cfg = DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", rows))), settings(tmp_path, num_workers=2)
    with pytest.raises(DataError, match=f"d.jsonl:{2 * CHUNK_ROWS + 8}: not valid JSON") as e:
        ensure_store(request_for(source, cfg, tok), cfg, tok)
    assert "data.on_error=skip" in str(e.value)
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []  # no store, no partial folder
    skipping = settings(tmp_path, num_workers=2, on_error="skip")
    store = store_for(source, skipping, tok)
    assert store.stats["skipped"] == 1 and len(store) == len(rows) - 1
    assert f"d.jsonl:{2 * CHUNK_ROWS + 8}" in store.stats["skipped_where"][0]


class DyingTokenizer(PreTrainedTokenizerFast):
    """A tokenizer whose process dies on a text holding "DIE", as a worker killed for lack of memory does."""

    def __call__(self, text, *args, **kwargs):
        if any("DIE" in t for t in (text if isinstance(text, list) else [text])):
            os._exit(9)
        return super().__call__(text, *args, **kwargs)


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path):
    tok = DyingTokenizer(tokenizer_object=build_tokenizer().backend_tokenizer, pad_token="<pad>", eos_token="</s>")
    rows = [{"prompt": f"q{i}", "completion": " a"} for i in range(8 * CHUNK_ROWS)]
    rows[6 * CHUNK_ROWS + 1] = {"prompt": "DIE", "completion": " a"}  # after 2 x workers chunks are in flight
    source, cfg = DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", rows))), settings(tmp_path, num_workers=2)
    with pytest.raises(DataError, match="a tokenizer worker process died .*lower data.num_workers"):
        ensure_store(request_for(source, cfg, tok), cfg, tok)
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []


def test_a_cache_that_cannot_be_written_serves_built_stores_and_otherwise_is_named(tok, tmp_path, caplog):
    source = DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", demo_rows(6))))
    cfg = settings(tmp_path)
    request = request_for(source, cfg, tok)
    ensure_store(request, cfg, tok)
    # The lock cannot be taken (as in a read-only cache; a folder in its place stops even root): the built store serves.
    lock = request.folder.with_name(request.folder.name + ".lock")
    lock.unlink()
    lock.mkdir()
    with caplog.at_level("INFO", logger="ftscale"):
        assert ensure_store(request, cfg, tok) is False
    assert "cache not writable" in caplog.text
    # With no store to serve, the error names the setting.
    other = settings(tmp_path, max_seq_len=100)
    other_request = request_for(source, other, tok)
    other_request.folder.with_name(other_request.folder.name + ".lock").mkdir(parents=True)
    with pytest.raises(DataError, match=f"data.cache_dir={tmp_path}/cache: cannot build the token store of .*d.jsonl there"):
        ensure_store(other_request, other, tok)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = settings(tmp_path, cache_dir=str(blocker / "cache"))
    with pytest.raises(DataError, match=f"data.cache_dir={blocker}/cache: cannot build .*Not a directory"):
        ensure_store(request_for(source, bad, tok), bad, tok)


def test_a_template_that_refuses_a_conversation_is_a_row_error(tmp_path):
    t = build_tokenizer()
    t.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows = [{"messages": CHAT["messages"][1:]}, CHAT]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match="d.jsonl:2: the chat template refuses this conversation \\(no system messages\\)"):
        tokenize_sources([DataSource(path=str(path))], DataConfig(), t)
    examples, stats = tokenize_sources([DataSource(path=str(path))], DataConfig(on_error="skip"), t)
    assert len(examples) == 1 and stats.skipped == 1


# ---- ranks -------------------------------------------------------------------------------------------------------
def _rank(rank: int, world: int, port: int, caches: list[str], hosts: list[str], out: str, build_s: list[float], stale_s: float) -> None:
    """One rank of a gloo group calling build_once; `hosts` stands in for the machines ranks run on."""
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cache = caches[rank]

    def build():
        if build_s[rank] < 0:
            os.kill(os.getpid(), signal.SIGKILL)  # a builder that dies
        if build_s[rank] == 0:
            raise DataError(f"data.jsonl:3: not valid JSON (rank {rank})")
        time.sleep(build_s[rank])  # longer than a poll: the other ranks must wait for it
        (Path(cache) / "store").mkdir(parents=True, exist_ok=True)
        (Path(cache) / f"built-by-{rank}").write_text(str(time.time()))

    try:
        build_once(Path(cache), ["store"], rank, build, stale_after_s=stale_s, host=hosts[rank])
        Path(out, f"rank{rank}").write_text(json.dumps({"sees_store": (Path(cache) / "store").is_dir(), "returned": time.time()}))
    except DataError as e:
        Path(out, f"rank{rank}").write_text(json.dumps({"error": str(e)}))


def run_ranks(tmp_path, caches, hosts, build_s, stale_s=3.0) -> tuple[list[dict], list[int | None]]:
    """Start the ranks as plain processes (start_processes would stop them all when one dies) and wait for them."""
    spawn = mp.get_context("spawn")
    args = (len(hosts), free_port(), caches, hosts, str(tmp_path), build_s, stale_s)
    ranks = [spawn.Process(target=_rank, args=(r, *args)) for r in range(len(hosts))]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=120)
    results = [json.loads(f.read_text()) if (f := tmp_path / f"rank{r}").exists() else {} for r in range(len(hosts))]
    return results, [p.exitcode for p in ranks]


@pytest.mark.parametrize("shared", [True, False])
def test_one_builder_per_shared_cache_and_every_rank_waits_for_all_builders(tmp_path, shared):
    # Three ranks. Shared: one cache, rank 0 builds, 1 and 2 wait. Not shared: hosts "a" (ranks 0, 1) and "b"
    # (rank 2), each with its own cache: ranks 0 and 2 build, and everyone waits for the slower of them.
    caches = [str(tmp_path / "cache")] * 3 if shared else [str(tmp_path / "a")] * 2 + [str(tmp_path / "b")]
    hosts = ["a", "a", "a"] if shared else ["a", "a", "b"]
    results, codes = run_ranks(tmp_path, caches, hosts, build_s=[0.6, 0.6, 1.5])
    assert codes == [0, 0, 0] and all(r["sees_store"] for r in results)
    built = {p.name: float(p.read_text()) for c in set(caches) for p in Path(c).glob("built-by-*")}
    assert sorted(built) == (["built-by-0"] if shared else ["built-by-0", "built-by-2"])
    assert min(r["returned"] for r in results) >= max(built.values())  # nobody left before every builder was done
    leftovers = [p.name for c in set(caches) for p in Path(c).iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the probe is gone


def test_a_build_longer_than_the_stale_limit_lives_on_its_heartbeat(tmp_path):
    results, codes = run_ranks(tmp_path, [str(tmp_path / "cache")] * 2, ["a", "a"], build_s=[2.5, 0], stale_s=1.0)
    assert codes == [0, 0] and all(r["sees_store"] for r in results)


def test_a_builder_that_dies_ends_the_wait_with_the_same_error_on_every_rank(tmp_path):
    caches, hosts = [str(tmp_path / "a"), str(tmp_path / "a"), str(tmp_path / "b")], ["a", "a", "b"]
    results, codes = run_ranks(tmp_path, caches, hosts, build_s=[0.1, 0.1, -1])  # rank 2, host b's builder, is killed
    assert codes == [0, 0, -signal.SIGKILL]
    for r in (0, 1):
        assert results[r]["error"] == "rank 2 stopped building the token stores (no sign of life for 3 s): see its log"


def test_a_failed_build_stops_every_rank_with_its_error(tmp_path):
    caches, hosts = [str(tmp_path / "a"), str(tmp_path / "a"), str(tmp_path / "b")], ["a", "a", "b"]
    results, codes = run_ranks(tmp_path, caches, hosts, build_s=[1.0, 1.0, 0])  # a builder other than rank 0 fails
    assert codes == [0, 0, 0]
    assert results[2]["error"] == "data.jsonl:3: not valid JSON (rank 2)"
    for r in (0, 1):
        assert results[r]["error"] == "the token store build failed on rank 2: DataError: data.jsonl:3: not valid JSON (rank 2)"


# ---- packing -----------------------------------------------------------------------------------------------------
def realistic_lengths(n: int, max_len: int, seed: int = 0) -> np.ndarray:
    """Instruction-data lengths: log-normal, from a few tokens to beyond max_seq_len (then truncated to it)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(max_len / 4), 0.9, n).astype(np.int64), 4, max_len)


@pytest.mark.parametrize("max_len", [64, 512, 2048])
def test_best_fit_rows_keep_every_example_once_within_max_len_and_fill_over_95_percent(max_len):
    lengths = realistic_lengths(20000, max_len)
    order, bounds = best_fit_rows(lengths, max_len, seed=3, window=20000)
    assert sorted(order.tolist()) == list(range(len(lengths)))  # every example exactly once
    per_row = np.add.reduceat(lengths[order], bounds[:-1])
    assert per_row.max() <= max_len and (np.diff(bounds) > 0).all()
    fill = lengths.sum() / (len(per_row) * max_len)
    greedy = lengths.sum() / ((len(greedy_rows(lengths, max_len)) - 1) * max_len)
    assert fill >= 0.95 > greedy + 0.05, (fill, greedy)
    again, again_bounds = best_fit_rows(lengths, max_len, seed=3, window=20000)
    assert np.array_equal(again, order) and np.array_equal(again_bounds, bounds)  # deterministic for a seed
    assert not np.array_equal(best_fit_rows(lengths, max_len, seed=4, window=20000)[0], order)


def test_best_fit_windows_and_examples_as_long_as_a_row():
    lengths = np.array([10, 10, 7, 3, 5, 5, 1, 9])
    order, bounds = best_fit_rows(lengths, 10, seed=0, window=3)
    rows = [sorted(lengths[order[a:b]].tolist()) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert sorted(order.tolist()) == list(range(8)) and all(sum(r) <= 10 for r in rows)
    assert rows.count([10]) == 2  # a full-length example is a row of its own
    # Windows of 3 examples are packed one after another: no row takes examples of two windows.
    window_of = {int(i): k // 3 for k, i in enumerate(np.random.default_rng(0).permutation(8))}
    assert all(len({window_of[int(i)] for i in order[a:b]}) == 1 for a, b in zip(bounds, bounds[1:], strict=False))
    with pytest.raises(ValueError, match="an example of 11 tokens cannot be packed into rows of 10"):
        best_fit_rows(np.array([3, 11]), 10, seed=0, window=3)


# ---- mixing ------------------------------------------------------------------------------------------------------
def test_quotas_sum_to_the_total_in_proportion():
    assert quotas(10, [1, 1, 1]) == [4, 3, 3]
    assert quotas(7, [3, 1]) == [5, 2]
    assert sum(quotas(10001, [0.7, 0.2, 0.1])) == 10001


def test_weighted_mixing_matches_its_weights_over_10k_training_rows(tok, tmp_path):
    """Three sources of very different sizes; the rows trained on over 10k draws have the weights' shares."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": " x"} for i in range(3000)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": " y"} for i in range(300)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"c{i}", "completion": " z"} for i in range(700)])
    weights = {a: 0.5, b: 0.3, c: 0.2}
    cfg = settings(tmp_path, train=[DataSource(path=str(p), weight=w) for p, w in weights.items()], packing=False, num_workers=0)
    data = build_datasets(cfg, tok, seed=5)
    from ftscale.data import StepSampler

    sampler = StepSampler(data.train, micro_batch_size=10, accumulation_steps=1, rank=0, world=1, seed=5)
    seen = {a: 0, b: 0, c: 0}
    by_letter = {"a": a, "b": b, "c": c}
    for step in range(1000):  # 10,000 rows
        for row in sampler.micro_batches(step)[0]:
            seen[by_letter[tok.decode(row.input_ids.tolist())[0]]] += 1
    n = sum(seen.values())
    assert n == 10000
    for path, w in weights.items():
        sigma = (w * (1 - w) / n) ** 0.5
        assert abs(seen[path] / n - w) < 4 * sigma, (path, seen[path] / n, w)
    assert any("b.jsonl: 300 usable, 1200 in the training stream (4.00x)" in line for line in data.mixture)


def test_mixing_over_and_under_samples_by_seed():
    pools = [np.arange(0, 10), np.arange(10, 1000)]
    mixed = mix(pools, [0.5, 0.5], seed=1, names=["small", "large"])
    assert [len(m) for m in mixed] == [500, 500]
    assert (np.bincount(mixed[0], minlength=10) == 50).all()  # 50 whole copies of the small source
    assert len(set(mixed[1].tolist())) == 500  # a sample of the large one without replacement
    assert np.array_equal(mix(pools, [0.5, 0.5], seed=1, names=["s", "l"])[1], mixed[1])
    assert mix(pools, None, seed=1, names=["s", "l"]) is pools
    with pytest.raises(DataError, match="empty.jsonl: has weight but no usable example"):
        mix([np.arange(3), np.zeros(0, np.int64)], [1, 1], seed=0, names=["a", "empty.jsonl"])


def test_weights_are_set_on_all_training_sources_or_none():
    from ftscale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="weight is set on some sources but not on b.jsonl"):
        load_config(None, ["data.train=[{path: a.jsonl, weight: 2}, {path: b.jsonl}]"])
    with pytest.raises(ConfigError, match="weight only applies to training sources"):
        load_config(None, ["data.eval=[{path: a.jsonl, weight: 2}]"])
    with pytest.raises(ConfigError, match="data.padding_free=false"):
        load_config(None, ["method.name=prompt_tuning", "data.packing=false", "data.padding_free=true"])


def test_a_weighted_best_fit_run_resumes_mid_epoch_exactly(tiny_model_dir, tmp_path):
    from ftscale.config import load_config
    from ftscale.recipes.sft import recipe_main

    rows = demo_rows(48)
    train = {"a": write_jsonl(tmp_path / "a.jsonl", rows[:36]), "b": write_jsonl(tmp_path / "b.jsonl", rows[36:])}
    mixed = f"[{{path: {train['a']}, weight: 0.5}}, {{path: {train['b']}, weight: 0.5}}]"

    def train_until(out, steps):
        data = {"train": train["a"], "eval": write_jsonl(tmp_path / "eval.jsonl", demo_rows(4, "eval"))}
        overrides = tiny_overrides(
            tiny_model_dir, data, out, **{"training.max_steps": steps, "checkpoint.every_steps": 3, "data.cache_dir": tmp_path / "c"}
        )
        return recipe_main(load_config(None, [*overrides, f"data.train={mixed}"]))

    whole = train_until(tmp_path / "whole", 6)
    assert whole["data"]["rows"] // 2 > 6  # two rows a step: step 3 is mid-epoch
    train_until(tmp_path / "split", 3)
    resumed = train_until(tmp_path / "split", 6)
    assert [h["step"] for h in resumed["history"]] == [0, 1, 2, 3, 4, 5, 6]  # 0: the evaluation before training
    assert_same_adapter(adapter(tmp_path / "split"), adapter(tmp_path / "whole"))


# ---- padding-free ------------------------------------------------------------------------------------------------
def test_a_padding_free_micro_batch_computes_no_pad_and_gives_the_padded_loss(tok, tmp_path):
    source = DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", many_rows(12))))
    model = build_tiny_model(len(tok)).eval()
    for packing in (True, False):
        data = build_datasets(settings(tmp_path, train=[source], packing=packing, max_seq_len=256), tok, seed=0)
        rows = [data.train[i] for i in range(min(4, len(data.train)))]
        padded, flat = collate(rows, tok.pad_token_id, packing), collate(rows, tok.pad_token_id, packing, padding_free=True)
        assert flat["input_ids"].shape == (1, sum(len(r.input_ids) for r in rows))
        assert padded["input_ids"].shape == (len(rows), max(len(r.input_ids) for r in rows))
        if not packing:  # examples of different lengths: the padded batch computes pad tokens, the flat one none
            assert flat["input_ids"].numel() < padded["input_ids"].numel()
        assert "attention_mask" not in flat and (flat["input_ids"] != tok.pad_token_id).all()
        with torch.no_grad():
            losses = [model(**b, use_cache=False).loss for b in (padded, flat)]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        assert int((flat["labels"][0, 1:] != IGNORE_INDEX).sum()) == sum(r.loss_tokens for r in rows)


def test_training_padding_free_matches_padded_training(tiny_model_dir, tiny_data, tmp_path):
    from ftscale.config import load_config
    from ftscale.recipes.sft import recipe_main

    runs = [
        recipe_main(
            load_config(
                None,
                tiny_overrides(
                    tiny_model_dir, tiny_data, tmp_path / str(free), **{"data.padding_free": free, "data.cache_dir": tmp_path / "c"}
                ),
            )
        )
        for free in (False, True)
    ]
    assert train_losses(runs[1]["history"]) == pytest.approx(train_losses(runs[0]["history"]), rel=1e-4)
    assert runs[1]["eval_loss_after"] == pytest.approx(runs[0]["eval_loss_after"], rel=1e-4)


# ---- preprocess, then train without tokenizing --------------------------------------------------------------------
def test_preprocess_builds_ahead_and_training_then_never_tokenizes(tiny_model_dir, tiny_data, tmp_path, monkeypatch, capsys):
    from ftscale.cli import main
    from ftscale.config import load_config
    from ftscale.data import store_build
    from ftscale.recipes.sft import recipe_main

    overrides = tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "run", **{"data.cache_dir": tmp_path / "cache"})
    assert main(["preprocess", *overrides, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    train = report["sources"][0]
    assert train["built"] and train["examples"] == 48 and train["tokens"] > train["loss_tokens"] > 0
    assert sum(train["length_histogram"].values()) == 48 and report["train"]["fill"] > 0.5
    assert report["train"]["rows"] < 48 and report["eval_rows"] > 0
    assert main(["preprocess", *overrides]) == 0
    text = capsys.readouterr().out
    assert "ready in" in text and "packing best_fit" in text and "lengths: 64-127: 48" in text

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("training tokenized although the stores were built")

    monkeypatch.setattr(store_build, "tokenize_chunk", no_tokenizing)
    assert recipe_main(load_config(None, overrides))["steps"] == 6
