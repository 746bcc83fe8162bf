"""The redesign's contracts: backend code only under ftscale/distributed, the data order the sampler owns, the
trainer state a checkpoint holds, and launch settings read in one place."""

from __future__ import annotations

import ast
import json
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest

from ftscale.checkpoint import CheckpointError, TrainerState
from ftscale.config import ConfigError
from ftscale.data import IGNORE_INDEX, Row, StepSampler, collate
from ftscale.distributed.launch import read_launch_settings

from conftest import REPO

# Names of backends and of their specifics, in identifiers and in strings ("FSDP2", "ds_numel", os.environ keys).
BACKEND_NAMES = re.compile(
    r"fsdp|\bzero(?!s\b|s_|_grad)|deepspeed|dtensor|\bds_|\bddp\b|multi_(cpu|gpu)|fully_shard|distribute_tensor", re.I
)
RECIPE = REPO / "ftscale/recipes/sft.py"


def names_and_strings(path):
    """Identifier and string tokens of a module, docstrings left out (they may explain what a backend does)."""
    tokens = list(tokenize.tokenize(path.open("rb").readline))
    for prev, t in zip([None, *tokens], tokens, strict=False):
        docstring = t.type == tokenize.STRING and (
            prev is None or prev.type in (tokenize.INDENT, tokenize.NEWLINE, tokenize.NL, tokenize.ENCODING)
        )
        if t.type == tokenize.NAME or (t.type == tokenize.STRING and not docstring):
            yield t


def test_no_module_outside_distributed_names_a_backend():
    """Identifiers and strings (imports included) naming FSDP, ZeRO, DeepSpeed or DDP appear only under
    ftscale/distributed/; the config schema (ftscale/config/) may name the launch options it describes."""
    found = []
    for path in sorted((REPO / "ftscale").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(("ftscale/distributed/", "ftscale/config/")):
            continue
        found += [f"{rel}:{t.start[0]} {t.string}" for t in names_and_strings(path) if BACKEND_NAMES.search(t.string)]
    assert not found, found


def test_the_recipe_reaches_distribution_only_through_the_backend_interface():
    """From ftscale.distributed the recipe imports the launch settings, the Accelerator and the Backend, never an
    implementation or its helpers; and nothing outside ftscale/distributed reads the environment."""
    imported = {
        node.module
        for node in ast.walk(ast.parse(RECIPE.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftscale.distributed")
    }
    assert imported == {"ftscale.distributed.accelerator", "ftscale.distributed.backend", "ftscale.distributed.launch"}
    assert environment_readers() == []


def environment_readers(root: Path = REPO / "ftscale") -> list[str]:
    """Modules outside ftscale/distributed that read os.environ (a worker process setting a variable is no read)."""
    readers = []
    for p in root.rglob("*.py"):
        if p.is_relative_to(root / "distributed"):
            continue
        tree = ast.parse(p.read_text())
        written = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "environ" and id(node) not in written:
                readers.append(f"{p.relative_to(root)}:{node.lineno}")
    return readers


def test_the_environment_check_sees_reads_and_lets_writes_pass(tmp_path):
    (tmp_path / "distributed").mkdir()
    (tmp_path / "distributed/launch.py").write_text('import os\nx = os.environ["B"]\n')
    (tmp_path / "worker.py").write_text('import os\nos.environ["A"] = "1"\n')
    assert environment_readers(tmp_path) == []
    (tmp_path / "worker.py").write_text('import os\nos.environ["A"] = "1"\nx = os.environ.get("B")\n')
    assert environment_readers(tmp_path) == ["worker.py:3"]


class Rows(list):
    """Rows in memory with the per-row loss-token counts the sampler reads (as StoreRows has them)."""

    @property
    def loss_tokens(self) -> np.ndarray:
        return np.array([r.loss_tokens for r in self])

    @property
    def row_tokens(self) -> np.ndarray:
        return np.array([len(r.input_ids) for r in self])

    @property
    def row_examples(self) -> np.ndarray:
        return np.ones(len(self), np.int64)

    @property
    def row_context(self) -> np.ndarray:
        return np.array([int((r.position_ids + 1).sum()) for r in self])


def rows(n: int) -> Rows:
    """Rows of different lengths and loss-token counts, so any mix-up of rows changes the counts."""
    out = Rows()
    for i in range(n):
        length, masked = 3 + i % 5, 1 + i % 3
        out.append(Row(np.arange(length), np.array([IGNORE_INDEX] * masked + [7] * (length - masked)), np.arange(length)))
    return out


@pytest.mark.parametrize("world, micro, accumulation", [(2, 2, 1), (2, 1, 3), (4, 2, 2), (3, 1, 1)])
def test_n_processes_see_exactly_the_rows_one_process_sees(world, micro, accumulation):
    data = rows(50)
    one = StepSampler(data, micro * world, accumulation, rank=0, world=1, seed=3)
    ranks = [StepSampler(data, micro, accumulation, rank=r, world=world, seed=3) for r in range(world)]
    assert one.steps_per_epoch == ranks[0].steps_per_epoch > 0
    for step in range(2 * one.steps_per_epoch + 1):  # across epochs: a new permutation each
        whole = one.micro_batches(step)
        split = [rank.micro_batches(step) for rank in ranks]
        for k in range(accumulation):
            assert [id(r) for s in split for r in s[k]] == [id(r) for r in whole[k]], (step, k)
        batches = [collate(b, 0, packed=False) for s in split for b in s]
        assert ranks[0].step_totals(step).loss_tokens == sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    epochs = [
        sorted(i for step in range(e * one.steps_per_epoch, (e + 1) * one.steps_per_epoch) for i in one._step_order(step)) for e in (0, 1)
    ]
    assert (
        len(set(epochs[0])) == len(epochs[0])
        and epochs[0] != []
        and not np.array_equal(one._step_order(0), one._step_order(one.steps_per_epoch))
    )


def test_the_sampler_names_why_a_checkpoint_cannot_continue_its_order():
    sampler = StepSampler(rows(40), 2, 2, rank=0, world=2, seed=0)
    assert sampler.resume_problem(8, 40) is None
    assert "written with 4 rows per optimizer step" in sampler.resume_problem(4, 40)
    assert "micro_batch_size x gradient_accumulation_steps = 2" in sampler.resume_problem(4, 40)
    assert "had 41 rows, now 40" in sampler.resume_problem(8, 41)


def test_trainer_state_writes_an_old_checkpoints_file_byte_for_byte():
    text = (REPO / "tests/fixtures/checkpoint-before-redesign/step-00000003/trainer_state.json").read_text()
    state = TrainerState.from_json(json.loads(text), "fixture")
    assert state.step == 3 and state.rows_per_step == 2 and len(state.history) == 3
    assert state.to_json() == text


def test_trainer_state_without_a_required_key_is_refused_naming_it():
    data = json.loads(TrainerState(step=2, history=[]).to_json())
    del data["tokens_seen"]
    with pytest.raises(CheckpointError, match=r"ckpt: trainer_state.json lacks tokens_seen"):
        TrainerState.from_json(data, "ckpt")
    with pytest.raises(CheckpointError, match="lacks step"):
        TrainerState.from_json([1, 2], "ckpt")


def test_launch_settings_are_read_from_the_launch_environment():
    assert read_launch_settings({}).backend == "ddp"
    fsdp = read_launch_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"})
    assert fsdp.backend == "fsdp2" and not fsdp.fsdp.reshard_after_forward and fsdp.fsdp.ram_efficient_loading
    ds = read_launch_settings({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "CPU"})
    assert ds.backend == "deepspeed" and ds.deepspeed_offload == {"cpu"} and ds.fsdp is None
    assert read_launch_settings({"ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}).deepspeed_offload == frozenset()
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        read_launch_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
