"""Bad input of every kind ends in one `ftscale <command>: error: ...` line with exit code 2 that names the file,
line or key and what to change; never a traceback, and never a half-written output.

Each case runs the real command line in this process (`ftscale.cli.main`), so an exception that is not an
FtscaleError fails the test with its traceback."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ftscale.checkpoint import export_adapter
from ftscale.cli import main
from ftscale.config import load_config
from ftscale.recipes.sft import recipe_main

from conftest import build_tiny_model, demo_rows, tiny_overrides, write_jsonl
from helpers import adapter, assert_same_adapter

GOOD = demo_rows(1)[0]


def cli(capsys, *argv) -> tuple[int, str]:
    # A recipe run earlier in this process left a log handler on a captured stream that is now closed.
    logging.getLogger().handlers.clear()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def assert_refused(capsys, argv, message: str) -> str:
    code, err = cli(capsys, *argv)
    assert code == 2, err
    line = next((line for line in err.splitlines() if "error:" in line), "")
    assert line.startswith(f"ftscale {argv[0]}: error: "), err
    assert message in err, err
    return err


# ---- data: every row format problem, every file problem, through `ftscale train` --------------------------------
BAD_ROWS = {
    "invalid-json": ('{"messages": [}', "d.jsonl:2: not valid JSON"),
    "not-utf8": (b'{"text": "caf\xe9"}', "d.jsonl:2: not UTF-8 text (byte 0xe9 at column 14)"),
    "row-is-a-list": ("[1, 2]", "d.jsonl:2: a row must be a JSON object, got list"),
    "unknown-keys": ('{"question": "a", "answer": "b"}', "d.jsonl:2: cannot tell the row's format from its keys ['answer', 'question']"),
    "messages-not-list": ('{"messages": "hi"}', "d.jsonl:2: 'messages' must be a list of {role, content} objects, got str"),
    "empty-conversation": ('{"messages": []}', "d.jsonl:2: empty conversation"),
    "bad-role": ('{"messages": [{"role": "robot", "content": "x"}]}', "d.jsonl:2: message 0 has role 'robot'"),
    "content-not-string": ('{"messages": [{"role": "user", "content": 3}]}', "d.jsonl:2: message 0 content must be a string, got int"),
    "no-assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', "d.jsonl:2: conversation has no assistant message"),
    "alpaca-no-output": ('{"instruction": "x", "output": null}', "d.jsonl:2: missing field 'output'"),
    "completion-not-string": ('{"prompt": "x", "completion": 5}', "d.jsonl:2: field 'completion' must be a string, got int"),
    "empty-text": ('{"text": "  "}', "d.jsonl:2: field 'text' is empty"),
    "nested-too-deep": ("[" * 100_000, "d.jsonl:2: JSON nested too deeply to read"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_names_file_and_line(case, capsys, tiny_model_dir, tmp_path):
    row, message = BAD_ROWS[case]
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + (row if isinstance(row, bytes) else row.encode()) + b"\n")
    err = assert_refused(capsys, ["train", *tiny_overrides(tiny_model_dir, {"train": path, "eval": path}, tmp_path / "run")], message)
    assert "data.on_error=skip" in err
    assert not (tmp_path / "run/checkpoints").exists() and not (tmp_path / "run/adapter").exists()


def _parquet(path: Path) -> None:
    path.write_bytes(b"PAR1 this is not a parquet body")


def _csv(path: Path) -> None:
    path.write_text('messages\n"[{""role"": ""user""\n')


def _json_not_list(path: Path) -> None:
    path.write_text('{"rows": 1}')


def _json_invalid(path: Path) -> None:
    path.write_text('[{"text": "a"},\n {"text": }]')


def _json_latin1(path: Path) -> None:
    path.write_bytes('[{"text": "caf\xe9"}]'.encode("latin-1"))


def _blank(path: Path) -> None:
    path.write_text("\n\n")


def _not_a_dataset_folder(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("hello")


BAD_FILES = {
    "corrupt-parquet": ("d.parquet", _parquet, "d.parquet: cannot be read as Parquet"),
    "corrupt-csv": ("d.csv", _csv, "d.csv: cannot be read as CSV"),
    "json-not-a-list": ("d.json", _json_not_list, "d.json: a .json source must hold a list of row objects"),
    "json-invalid": ("d.json", _json_invalid, "d.json:2: not valid JSON"),
    "json-not-utf8": ("d.json", _json_latin1, "d.json: not UTF-8 text"),
    "only-blank-lines": ("d.jsonl", _blank, "the training data has no usable example after reading"),
    "unsupported-type": ("d.txt", lambda p: p.write_text("x"), "d.txt: unsupported file type '.txt'"),
    "missing-file": ("nope.jsonl", lambda p: None, "nope.jsonl: no such file or folder"),
    "not-a-datasets-folder": ("folder", _not_a_dataset_folder, "folder: not a folder written by datasets' save_to_disk"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_file_is_named(case, capsys, tiny_model_dir, tiny_data, tmp_path):
    name, make, message = BAD_FILES[case]
    make(tmp_path / name)
    data = {"train": tmp_path / name, "eval": tiny_data["eval"]}
    assert_refused(capsys, ["train", *tiny_overrides(tiny_model_dir, data, tmp_path / "run")], message)


def test_utf8_bom_is_accepted_and_a_non_utf8_line_can_be_skipped(tiny_model_dir, tiny_data, tmp_path):
    lines = [json.dumps(r).encode() for r in demo_rows(12)]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\n" + b'{"text": "caf\xe9"}\n' + b"\n".join(lines[1:]) + b"\n")
    overrides = tiny_overrides(
        tiny_model_dir, {"train": path, "eval": tiny_data["eval"]}, tmp_path / "run", **{"training.max_steps": 1, "data.on_error": "skip"}
    )
    summary = recipe_main(load_config(None, overrides))
    assert summary["data"]["examples"] == 12 and summary["data"]["skipped"] == 1  # the BOM row counts, the latin-1 row is skipped


# ---- config: file, keys, values, overrides, cross-section rules ---------------------------------------------------
def _config(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


BAD_CONFIGS = {
    "typo": (
        "training:\n  lerning_rate: 1e-4\n",
        [],
        "recipe.yaml:2: unknown key 'training.lerning_rate': did you mean 'training.learning_rate'?",
    ),
    "wrong-type": ("training:\n  epochs: two\n", [], "recipe.yaml:2: key 'training.epochs'"),
    "betas-out-of-range": (
        "",
        ["training.adam_betas=[1.5, 0.9]"],
        "command-line override: key 'training.adam_betas.0': Input should be less than 1",
    ),
    "override-not-yaml": ("", ["data.train=[{path:"], "override 'data.train=[{path:': the value is not valid YAML"),
    "override-without-value": ("", ["training.learning_rate"], "must look like key.sub=value"),
    "override-bad-index": ("", ["data.train.3.path=x"], "'3' is not an index of the 0-item list"),
    "not-a-mapping": ("- a\n- b\n", [], "the top level must be a mapping of sections"),
    "not-yaml": ("training: [\n", [], "not valid YAML"),
    "not-utf8": (b"training:\n  seed: \xff\n", [], "not a text (UTF-8) file"),
    "prompt-method-with-packing": ("method:\n  name: prefix_tuning\n", [], "set data.packing=false"),
    "eval-fraction-too-big": ("", ["data.eval_fraction=1.5"], "key 'data.eval_fraction': Input should be less than 1"),
    "warmup-not-whole": ("", ["training.warmup_steps=2.5"], "warmup_steps must be a whole number"),
    "ia3-feedforward-not-target": ("", ["method.ia3.feedforward_modules=[up_proj]"], "must also be listed in method.ia3.target_modules"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_names_file_line_or_key(case, capsys, tmp_path):
    text, overrides, message = BAD_CONFIGS[case]
    assert_refused(capsys, ["config", "show", "--config", _config(tmp_path, text), *overrides], message)


def test_missing_config_file_and_unknown_get_key(capsys, tmp_path):
    assert_refused(capsys, ["config", "show", "--config", tmp_path / "nope.yaml"], "cannot read config")
    assert_refused(capsys, ["config", "get", "training.lerning_rate"], "training.lerning_rate: no such config key")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"model.path": "/no/such/model"}, "model.path=/no/such/model: no such model folder"),
        ({"model.path": "relative/no/such/model"}, "model.path=relative/no/such/model: no such model folder"),
        ({"data.train": "[]"}, "no training data: set data.train to your files"),
    ],
    ids=["absolute-model-path", "relative-model-path", "no-training-data"],
)
def test_train_refuses_missing_model_or_data(settings, message, capsys, tiny_model_dir, tiny_data, tmp_path):
    assert_refused(capsys, ["train", *tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "run", **settings)], message)


def test_model_folder_without_config(capsys, tiny_data, tmp_path):
    (tmp_path / "model").mkdir()
    assert_refused(capsys, ["train", *tiny_overrides(tmp_path / "model", tiny_data, tmp_path / "run")], "the folder has no config.json")


# ---- merge: base, adapter and option problems ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-inputs")
    build_tiny_model(300, tie=False, layers=2).save_pretrained(root / "base")
    for name, config in {
        "lora": LoraConfig(r=4, target_modules=["q_proj", "down_proj"]),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }.items():
        get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), config).save_pretrained(root / name)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
    ).save_pretrained(root / "wider")
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _merge_case(case: str, root: Path, tmp: Path) -> tuple[list, str]:
    base, lora = root / "base", root / "lora"
    if case == "missing-base":
        return ["--base", tmp / "nope", "--adapter", lora], "no such model folder"
    if case == "missing-adapter":
        return ["--base", base, "--adapter", tmp / "nope"], "no adapter_config.json: not a peft adapter folder"
    if case == "adapter-config-not-json":
        bad = _copy(lora, tmp / "a")
        (bad / "adapter_config.json").write_text('{"r": 4,')
        return ["--base", base, "--adapter", bad], "adapter_config.json: not readable JSON"
    if case == "adapter-config-without-r":
        bad = _copy(lora, tmp / "a")
        cfg = json.loads((bad / "adapter_config.json").read_text())
        del cfg["r"]
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        return ["--base", base, "--adapter", bad], "adapter_config.json: no 'r', which a LORA adapter config must have"
    if case == "adapter-config-a-list":
        bad = _copy(lora, tmp / "a")
        (bad / "adapter_config.json").write_text("[]")
        return ["--base", base, "--adapter", bad], "must hold a JSON object"
    if case == "truncated-adapter":
        bad = _copy(lora, tmp / "a")
        _truncate(bad / "adapter_model.safetensors", 0.6)
        return ["--base", base, "--adapter", bad], "adapter_model.safetensors: truncated: tensor"
    if case == "ia3-on-other-shapes":
        return [
            "--base",
            root / "wider",
            "--adapter",
            root / "ia3",
        ], "'model.layers.0.mlp.down_proj.weight' has shape (any, 128), the base's is (96, 160)"
    if case == "lora-on-other-shapes":
        return ["--base", root / "wider", "--adapter", lora], "adapter and base do not match"
    if case == "prompt-adapter":
        return ["--base", base, "--adapter", root / "prompt"], "nothing to merge"
    if case == "truncated-base":
        bad = _copy(base, tmp / "b")
        _truncate(bad / "model.safetensors", 0.75)
        return ["--base", bad, "--adapter", lora], "model.safetensors: truncated: tensor"
    if case == "base-header-garbage":
        bad = _copy(base, tmp / "b")
        (bad / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"nope!" + b"\0" * 64)
        return ["--base", bad, "--adapter", lora], "not a safetensors file (its header is not JSON)"
    if case == "base-offsets-overlap":
        bad = _copy(base, tmp / "b")
        raw = (bad / "model.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        first = next(k for k in header if k != "__metadata__")
        header[first]["data_offsets"][1] += 4  # claims more bytes than its shape needs
        text = json.dumps(header).encode()
        (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
        return ["--base", bad, "--adapter", lora], f"corrupt safetensors header: tensor '{first}'"
    if case == "base-without-config":
        bad = _copy(base, tmp / "b")
        (bad / "config.json").unlink()
        return ["--base", bad, "--adapter", lora], "no config.json, so a merged model written from it would not load"
    if case == "index-lists-missing-shard":
        bad = _copy(base, tmp / "b")
        (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00009.safetensors"}}))
        return ["--base", bad, "--adapter", lora], "lists shard model-00009.safetensors, which is not in"
    if case in ("invalid-regex", "token-index-out-of-range", "dora-magnitude-length", "peft-type-not-a-string", "no-weights"):
        bad = _copy(lora, tmp / "a")
        cfg = json.loads((bad / "adapter_config.json").read_text())
        if case == "invalid-regex":
            cfg["rank_pattern"] = {"q_proj(": 2}
            message = "'q_proj(' is not a valid regular expression"
        elif case == "peft-type-not-a-string":
            cfg["peft_type"] = ["LORA"]
            message = "peft_type must be a string"
        elif case == "no-weights":
            save_file({}, str(bad / "adapter_model.safetensors"))
            message = "the adapter holds no LORA weights"
        else:
            tensors = load_file(str(bad / "adapter_model.safetensors"))
            module = "base_model.model.model.layers.0.self_attn.q_proj"
            if case == "dora-magnitude-length":
                tensors[f"{module}.lora_magnitude_vector"] = torch.ones(7)
                message = "q_proj.lora_magnitude_vector has 7 values for 64 output features"
            else:
                tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = torch.zeros(1, 64)
                cfg["trainable_token_indices"] = [999]
                message = "changes row 999 of 'model.embed_tokens.weight', which has 300 rows"
            save_file(tensors, str(bad / "adapter_model.safetensors"))
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        return ["--base", base, "--adapter", bad], message
    if case == "ftscale-meta-not-json":
        bad = _copy(lora, tmp / "a")
        (bad / "ftscale_adapter.json").write_text("{oops")
        return ["--base", base, "--adapter", bad], "ftscale_adapter.json: not readable JSON"
    if case in SAFETENSORS_DAMAGE:
        bad = _copy(base, tmp / "b")
        SAFETENSORS_DAMAGE[case][0](bad / "model.safetensors")
        return ["--base", bad, "--adapter", lora], SAFETENSORS_DAMAGE[case][1]
    if case == "shard-size-zero":
        return ["--base", base, "--adapter", lora, "--max-shard-size", "0"], "shard size '0' is not positive"
    if case == "shard-size-words":
        return ["--base", base, "--adapter", lora, "--max-shard-size", "lots"], "cannot read size 'lots'"
    raise AssertionError(case)


def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = change(header, raw[8 + n :])
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _first(header: dict) -> dict:
    return header[min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])]


SAFETENSORS_DAMAGE = {
    "st-too-short": (lambda p: p.write_bytes(b"\x01\x02"), "too short to be a safetensors file"),
    "st-gap": (
        lambda p: _rewrite_header(
            p,
            lambda h, b: (
                _first(h)["data_offsets"].__setitem__(0, 4),
                _first(h)["data_offsets"].__setitem__(1, _first(h)["data_offsets"][1] + 4),
                b"\0" * 4 + b,
            )[-1],
        ),
        "starts at byte",
    ),
    "st-trailing-bytes": (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 16), "16 bytes after the last tensor"),
    "st-unknown-dtype": (
        lambda p: _rewrite_header(p, lambda h, b: (_first(h).update(dtype="F4"), b)[-1]),
        "has dtype 'F4', which ftscale does not read",
    ),
    "st-overflowing-shape": (
        lambda p: _rewrite_header(p, lambda h, b: (_first(h).update(shape=[2**62, 4]), b)[-1]),
        "needs 73786976294838206464 bytes",
    ),
    "st-boolean-shape": (lambda p: _rewrite_header(p, lambda h, b: (_first(h).update(shape=[True]), b)[-1]), "has shape [True]"),
}


MERGE_CASES = [
    "missing-base",
    "missing-adapter",
    "adapter-config-not-json",
    "adapter-config-without-r",
    "adapter-config-a-list",
    "truncated-adapter",
    "ia3-on-other-shapes",
    "lora-on-other-shapes",
    "prompt-adapter",
    "truncated-base",
    "base-header-garbage",
    "base-offsets-overlap",
    "base-without-config",
    "index-lists-missing-shard",
    "shard-size-zero",
    "shard-size-words",
    "invalid-regex",
    "token-index-out-of-range",
    "dora-magnitude-length",
    "peft-type-not-a-string",
    "no-weights",
    "ftscale-meta-not-json",
    *SAFETENSORS_DAMAGE,
]


@pytest.mark.parametrize("case", MERGE_CASES)
def test_bad_merge_input_is_refused_and_writes_nothing(case, capsys, base_and_adapters, tmp_path):
    args, message = _merge_case(case, base_and_adapters, tmp_path)
    assert_refused(capsys, ["merge", *args, "--out", tmp_path / "out"], message)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_merge_over_an_existing_output_keeps_it_when_refused(capsys, base_and_adapters, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("user data")
    base = _copy(base_and_adapters / "base", tmp_path / "b")
    _truncate(base / "model.safetensors", 0.5)
    argv = ["merge", "--base", base, "--adapter", base_and_adapters / "lora", "--out", tmp_path / "out", "--overwrite"]
    assert_refused(capsys, argv, "truncated")
    assert (tmp_path / "out/keep.txt").read_text() == "user data"


# ---- checkpoints and export-adapter --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_dir, tiny_data):
    out = tmp_path_factory.mktemp("ckpt-run")
    recipe_main(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, out, **{"training.max_steps": 2})))
    return out / "checkpoints/step-00000002"


def _manifest_edit(ckpt: Path, edit) -> None:
    m = json.loads((ckpt / "manifest.json").read_text())
    edit(m)
    (ckpt / "manifest.json").write_text(json.dumps(m))


def _checkpoint_case(case: str, ckpt: Path, tmp: Path) -> tuple[Path, str]:
    if case == "not-a-step-folder":
        return tmp, "not a checkpoint folder (expected a name like step-00000012)"
    bad = _copy(ckpt, tmp / "checkpoints" / ckpt.name)
    shard = bad / "adapter/shard-00000-of-00001.safetensors"
    if case == "no-manifest":
        (bad / "manifest.json").unlink()
        return bad, "incomplete checkpoint (no readable manifest.json"
    if case == "manifest-not-json":
        (bad / "manifest.json").write_text("{")
        return bad, "incomplete checkpoint (no readable manifest.json"
    if case == "manifest-without-files":
        _manifest_edit(bad, lambda m: m.pop("files"))
        return bad, "corrupt manifest.json: it has no valid 'files' list"
    if case == "manifest-path-escapes":
        _manifest_edit(bad, lambda m: m["files"].update({"../../etc/passwd": {"bytes": 1, "sha256": "0"}}))
        return bad, "file '../../etc/passwd' points outside the checkpoint folder"
    if case == "manifest-absolute-path":
        _manifest_edit(bad, lambda m: m["files"].update({"/etc/passwd": {"bytes": 1, "sha256": "0"}}))
        return bad, "file '/etc/passwd' points outside the checkpoint folder"
    if case == "manifest-lacks-trainer-state":
        _manifest_edit(bad, lambda m: m["files"].pop("trainer_state.json"))
        return bad, "corrupt manifest.json: it does not list trainer_state.json"
    if case == "format-version":
        _manifest_edit(bad, lambda m: m.update(format_version=99))
        return bad, "checkpoint format 99, this ftscale reads 1"
    if case == "truncated-shard":
        _truncate(shard, 0.5)
        return bad, "adapter/shard-00000-of-00001.safetensors is missing or has the wrong size"
    if case == "flipped-byte":
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
        return bad, "adapter/shard-00000-of-00001.safetensors does not match its checksum"
    raise AssertionError(case)


CHECKPOINT_CASES = [
    "not-a-step-folder",
    "no-manifest",
    "manifest-not-json",
    "manifest-without-files",
    "manifest-path-escapes",
    "manifest-absolute-path",
    "manifest-lacks-trainer-state",
    "format-version",
    "truncated-shard",
    "flipped-byte",
]


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoint_is_refused_by_export_and_by_resume(case, capsys, checkpoint, tiny_model_dir, tiny_data, tmp_path):
    bad, message = _checkpoint_case(case, checkpoint, tmp_path)
    assert_refused(capsys, ["export-adapter", bad, tmp_path / "exported"], message)
    assert not (tmp_path / "exported").exists()
    resume = tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "run", **{"checkpoint.resume": str(bad)})
    assert_refused(capsys, ["train", *resume], message)


def test_export_refuses_an_existing_output_and_a_checkpoint_without_base_config(capsys, checkpoint, tmp_path):
    (tmp_path / "exported").mkdir()
    assert_refused(capsys, ["export-adapter", checkpoint, tmp_path / "exported"], "exists: choose another or pass --overwrite")
    bad = _copy(checkpoint, tmp_path / "c" / checkpoint.name)
    (bad / "base_config.json").unlink()
    _manifest_edit(bad, lambda m: m["files"].pop("base_config.json"))
    assert_refused(capsys, ["export-adapter", bad, tmp_path / "other"], "no base_config.json")


def test_only_files_the_manifest_lists_are_read(checkpoint, tmp_path):
    """A stray shard dropped into a checkpoint (another run's, a copy) is never loaded."""
    ckpt = _copy(checkpoint, tmp_path / "c" / checkpoint.name)
    real = load_file(str(ckpt / "adapter/shard-00000-of-00001.safetensors"))
    save_file({k: torch.full_like(v, 7.0) for k, v in real.items()}, str(ckpt / "adapter/shard-00001-of-00002.safetensors"))
    assert export_adapter(ckpt, tmp_path / "exported")["tensors"] == len(real)
    written = load_file(str(tmp_path / "exported/adapter_model.safetensors"))
    assert_same_adapter(written, adapter(checkpoint.parents[1]))  # same step, saved by the run


# ---- generated input: whatever arrives, the outcome is a result or one FtscaleError, never a traceback -------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["messages", "role", "content", "text", "prompt", "completion", "instruction", "input", "output"])
            | st.text(max_size=8),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
lines = st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40), st.text(max_size=40).map(str.encode))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(lines, min_size=1, max_size=6), skip=st.booleans())
def test_generated_rows_load_or_fail_with_a_data_error(rows, skip, tiny_tokenizer, tmp_path):
    from ftscale.config.data import DataConfig, DataSource
    from ftscale.data import DataError, tokenize_sources

    path = tmp_path / "generated.jsonl"
    raw_lines = [r.replace(b"\n", b" ") for r in rows]
    path.write_bytes(b"\n".join(raw_lines) + b"\n")
    cfg = DataConfig(on_error="skip" if skip else "raise", max_seq_len=64)
    try:
        examples, stats = tokenize_sources([DataSource(path=str(path))], cfg, tiny_tokenizer)
    except DataError as e:
        assert not skip and f"{path}:" in str(e)
        return
    counted = stats.examples + stats.skipped + stats.dropped + stats.no_loss
    assert counted == _rows_in(raw_lines)  # every line is an example or counted as skipped or dropped
    assert len(examples) == stats.examples


def _rows_in(raw_lines: list[bytes]) -> int:
    """Lines that are rows: not blank once decoded (a line that cannot be decoded is a row, a bad one)."""
    rows = 0
    for i, raw in enumerate(raw_lines):
        try:
            rows += bool(raw.decode("utf-8-sig" if i == 0 else "utf-8").strip())
        except UnicodeDecodeError:
            rows += 1
    return rows


keys = st.sampled_from(
    [
        "training.learning_rate",
        "training.adam_betas",
        "data.train",
        "data.eval_fraction",
        "method.lora.r",
        "method.name",
        "model.path",
        "data.train.0.path",
        "checkpoint.keep_last",
        "logging.level",
    ]
) | st.text(max_size=20)


@settings(max_examples=150, deadline=None)
@given(overrides=st.lists(st.tuples(keys, st.text(max_size=20)), max_size=3))
@example(overrides=[("function-after", "")])  # a key that reads like a step pydantic adds to error locations
@example(overrides=[("literal['a']", "1")])
def test_generated_overrides_load_or_fail_with_a_config_error(overrides):
    from ftscale.config import ConfigError

    try:
        load_config(None, [f"{k}={v}" for k, v in overrides])
    except ConfigError as e:
        assert str(e)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    argv=st.lists(
        st.sampled_from(
            [
                "config",
                "show",
                "get",
                "merge",
                "export-adapter",
                "--config",
                "--base",
                "--adapter",
                "--out",
                "--max-shard-size",
                "0",
                "-1",
                "x=1",
                "training.seed",
                "/nonexistent",
                ".",
                "",
            ]
        )
        | st.text(max_size=12),
        max_size=6,
    )
)
def test_generated_command_lines_end_in_a_result_or_a_one_line_error(argv, capsys):
    """`train` and `import-gguf` are left out: a generated command line could start real work."""
    if argv and argv[0] in ("train", "import-gguf", "compare"):
        argv = ["config", *argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors: one usage line and exit 2
        assert e.code in (0, 2)
        return
    finally:
        err = capsys.readouterr().err
        assert "Traceback" not in err
    assert code in (0, 2)


# ---- the other commands ---------------------------------------------------------------------------------------------
def test_compare_and_import_gguf_refuse_bad_input(capsys, tiny_model_dir, tiny_data, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    not_chat = write_jsonl(
        tmp_path / "text.jsonl", [{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}]
    )
    base = ["compare", "--base", tiny_model_dir, "--tuned", tiny_model_dir]
    assert_refused(capsys, [*base, "--data", empty], "empty.jsonl: no conversation to compare on")
    assert_refused(capsys, [*base, "--data", not_chat], "text.jsonl:1: the last message must be the assistant's reference answer")
    assert_refused(capsys, [*base, "--data", tiny_data["eval"], "--limit", "0"], "--limit 0: give a positive number")
    assert_refused(
        capsys, [*base, "--data", tiny_data["eval"], "--json-out", tmp_path / "no/such/report.json"], "must be a file in an existing folder"
    )
    assert_refused(capsys, ["compare", "--base", tmp_path / "nope", "--tuned", tiny_model_dir, "--data", tiny_data["eval"]], "--base=")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    assert_refused(
        capsys, ["import-gguf", "--gguf", tmp_path / "bad.gguf", "--out", tmp_path / "model"], "bad.gguf: cannot be read as a GGUF model"
    )
    assert_refused(capsys, ["import-gguf", "--gguf", tmp_path / "none.gguf", "--out", tmp_path / "model"], "none.gguf: no such file")
    assert not (tmp_path / "model").exists()


def test_config_get_walks_config_keys_only(capsys):
    assert_refused(capsys, ["config", "get", "model.path.upper"], "model.path.upper: no such config key")
    assert_refused(capsys, ["config", "get", "model.model_dump"], "no such config key")


def test_infinite_values_and_a_held_out_everything_are_refused(capsys, tiny_model_dir, tmp_path):
    assert_refused(
        capsys, ["config", "show", "training.learning_rate=.inf"], "key 'training.learning_rate': Input should be a finite number"
    )
    one = write_jsonl(tmp_path / "one.jsonl", [GOOD])
    overrides = tiny_overrides(
        tiny_model_dir, {"train": one, "eval": one}, tmp_path / "run", **{"data.eval": "[]", "data.eval_fraction": 0.5}
    )
    assert_refused(capsys, ["train", *overrides], "data.eval_fraction=0.5 held out all 1 of them")


def test_a_model_folder_with_truncated_weights_is_named_before_loading(capsys, tiny_model_dir, tiny_data, tmp_path):
    model = _copy(tiny_model_dir, tmp_path / "model")
    _truncate(model / "model.safetensors", 0.5)
    assert_refused(capsys, ["train", *tiny_overrides(model, tiny_data, tmp_path / "run")], "model.safetensors: truncated: tensor")


@pytest.mark.parametrize("case", ["manifest-without-world-size", "manifest-missing-a-rank", "file-links-outside"])
def test_manifests_that_do_not_describe_a_whole_checkpoint(case, capsys, checkpoint, tmp_path):
    bad = _copy(checkpoint, tmp_path / "checkpoints" / checkpoint.name)
    if case == "manifest-without-world-size":
        _manifest_edit(bad, lambda m: m.pop("world_size"))
        message = "world_size must be a positive integer"
    elif case == "manifest-missing-a-rank":
        _manifest_edit(bad, lambda m: m.update(world_size=2))
        message = "it does not list adapter/shard-00000-of-00002.safetensors"
    else:
        outside = tmp_path / "elsewhere.json"
        outside.write_text((bad / "scheduler.json").read_text())
        (bad / "scheduler.json").unlink()
        (bad / "scheduler.json").symlink_to(outside)
        message = "scheduler.json links outside the checkpoint folder"
    assert_refused(capsys, ["export-adapter", bad, tmp_path / "exported"], message)


def test_damaged_files_of_every_json_kind_and_a_corrupt_adapter_bin(capsys, base_and_adapters, checkpoint, tmp_path):
    lora = _copy(base_and_adapters / "lora", tmp_path / "a")
    (lora / "adapter_config.json").write_text('{"r": 1' + "0" * 5000 + "}")  # a number Python refuses to parse
    argv = ["merge", "--base", base_and_adapters / "base", "--adapter", lora, "--out", tmp_path / "out"]
    assert_refused(capsys, argv, "adapter_config.json: not readable JSON")
    shutil.copy(base_and_adapters / "lora/adapter_config.json", lora / "adapter_config.json")
    (lora / "adapter_model.safetensors").unlink()
    for content in (b"", b"\x80\x02junk", b"hello"):
        (lora / "adapter_model.bin").write_bytes(content)
        assert_refused(capsys, argv, "adapter_model.bin: cannot be read")
    bad = _copy(checkpoint, tmp_path / "checkpoints" / checkpoint.name)
    (bad / "manifest.json").write_text("[" * 100_000)
    assert_refused(capsys, ["export-adapter", bad, tmp_path / "exported"], "incomplete checkpoint (no readable manifest.json")
    _manifest_edit(_copy(checkpoint, tmp_path / "c2" / checkpoint.name), lambda m: m.update(world_size=10**9))
    assert_refused(
        capsys, ["export-adapter", tmp_path / "c2" / checkpoint.name, tmp_path / "exported"], "world_size must be a positive integer"
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda cfg: cfg.update(rank_pattern=["q_proj"]), "patterns must map module names to values"),
        (lambda cfg: cfg.update(lora_alpha=float("inf")), "must be positive numbers"),
    ],
    ids=["pattern-not-a-mapping", "infinite-alpha"],
)
def test_adapter_config_values_of_the_wrong_kind(edit, message, capsys, base_and_adapters, tmp_path):
    lora = _copy(base_and_adapters / "lora", tmp_path / "a")
    cfg = json.loads((lora / "adapter_config.json").read_text())
    edit(cfg)
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    assert_refused(capsys, ["merge", "--base", base_and_adapters / "base", "--adapter", lora, "--out", tmp_path / "out"], message)
