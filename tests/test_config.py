"""Config loading: typed validation, actionable errors, overrides, and `ftscale config show`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import BaseModel

from ftscale.config import ConfigError, FtscaleConfig, load_config, render_config

from conftest import REPO


def write(tmp_path, text: str):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs/smollm2-135m").glob("*.yaml"))
    methods = {"lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "bottleneck"}
    assert {c.stem for c in configs} == methods | {"seed-notebook"}
    for c in configs:
        assert load_config(c).method.name == (c.stem if c.stem in methods else "lora")
    seed = load_config(REPO / "configs/smollm2-135m/seed-notebook.yaml")
    lora, t = seed.method.lora, seed.training
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (6, 8, 0.05, "all-linear")
    assert (t.micro_batch_size, t.gradient_accumulation_steps, t.learning_rate) == (2, 2, 2e-4)
    assert (t.max_grad_norm, t.scheduler) == (0.3, "constant")


def test_unknown_key_names_file_line_and_closest_key(tmp_path):
    p = write(tmp_path, "training:\n  epochs: 2\n  lerning_rate: 1e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:3: unknown key 'training.lerning_rate': did you mean 'training.learning_rate'?" in str(e.value)


def test_unknown_section_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optimiser': valid keys here: model, method, data"):
        load_config(write(tmp_path, "optimiser:\n  lr: 1\n"))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe.yaml:2: key 'training.epochs': .*integer.*\(got 'two'\)"):
        load_config(write(tmp_path, "training:\n  epochs: two\n"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.lora.r=0", "key 'method.lora.r': Input should be greater than 0"),
        ("method.name=adapterx", "key 'method.name': Input should be 'lora', 'qlora'"),
        ("training.warmup_steps=2.5", "warmup_steps must be a whole number"),
        ("data.overlong=cut", "key 'data.overlong'"),
        ("method.ia3.feedforward_modules=[up_proj]", "must also be listed in method.ia3.target_modules"),
    ],
)
def test_impossible_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_prompt_methods_refuse_packing(method):
    with pytest.raises(ConfigError, match="set data.packing=false"):
        load_config(None, [f"method.name={method}"])
    assert load_config(None, [f"method.name={method}", "data.packing=false"]).method.name == method


def test_overrides_parse_yaml_values_and_index_lists(tmp_path):
    cfg = load_config(
        write(tmp_path, "data:\n  train: [{path: a.jsonl}, {path: b.jsonl}]\n"),
        ["training.learning_rate=3e-4", "data.train.1.format=alpaca", "method.lora.target_modules=[q_proj, v_proj]"],
    )
    assert cfg.training.learning_rate == 3e-4
    assert cfg.data.train[1].format == "alpaca" and cfg.data.train[0].path == "a.jsonl"
    assert cfg.method.lora.target_modules == ["q_proj", "v_proj"]


def test_override_errors_are_named():
    with pytest.raises(ConfigError, match="command-line override: unknown key 'method.lora.rank': did you mean 'method.lora.r'"):
        load_config(None, ["method.lora.rank=4"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(None, ["training.learning_rate"])
    with pytest.raises(ConfigError, match="'5' is not an index"):
        load_config(None, ["data.train.5.path=x"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "training: [\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def _fields(model: type[BaseModel], prefix=""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _fields(ann, f"{prefix}{name}.")


def test_every_option_has_a_default_and_a_description():
    for key, field in _fields(FtscaleConfig):
        assert field.description, f"{key} has no description"
    FtscaleConfig()  # every option has a default: an empty config validates


def test_config_show_round_trips_and_describes(tmp_path):
    cfg = load_config(REPO / "configs/smollm2-135m/qlora.yaml", ["training.max_steps=7"])
    text = render_config(cfg)
    assert "max_steps: 7  # Stop after this many optimizer steps." in text
    reloaded = write(tmp_path, text)
    assert load_config(reloaded) == cfg
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftscale.cli",
            "config",
            "show",
            "--config",
            str(REPO / "configs/smollm2-135m/lora.yaml"),
            "method.lora.r=4",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    assert "  r: 4  # LoRA rank" in out


def test_cli_reports_config_errors_without_traceback(tmp_path):
    p = write(tmp_path, "trainin:\n  epochs: 1\n")
    proc = subprocess.run([sys.executable, "-m", "ftscale.cli", "train", "--config", str(p)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "unknown key 'trainin': did you mean 'training'?" in proc.stderr
    assert "Traceback" not in proc.stderr
