"""Shared fixtures: a tiny tokenizer and tiny random Llama built in the test session, and small datasets.

Nothing here touches a hub. The tiny model is saved to disk and loaded back the way users load models."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from ftscale.config.model import DEFAULT_MODEL_PATH

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / DEFAULT_MODEL_PATH
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
# One token-store cache for the session's tiny runs (outside the checkout): the same data is tokenized once.
DATA_CACHE = Path(tempfile.mkdtemp(prefix="ftscale-test-stores-"))


def demo_rows(n: int, split: str = "train") -> list[dict]:
    lines = (REPO / f"data/demo/{split}.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def build_tokenizer(with_chatml_tokens: bool = True):
    """A byte-level BPE tokenizer trained on the demo data, with no chat template (ftscale adds ChatML)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"] + (["<|im_start|>", "<|im_end|>"] if with_chatml_tokens else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for r in demo_rows(400) for m in r["messages"]] + ["user assistant system \n"]
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_tiny_model(
    vocab_size: int, tie: bool = True, seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128, **config
):
    """A random Llama; `config`: more LlamaConfig settings (attention_bias, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **config,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama (tied embeddings) with its tokenizer, saved as a normal model folder."""
    out = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(len(tiny_tokenizer)).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def untied_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """tiny_model_dir's model with an output head of its own, not tied to the input embedding."""
    out = tmp_path_factory.mktemp("tiny-llama-untied")
    build_tiny_model(len(tiny_tokenizer), tie=False).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("data")
    return {"train": write_jsonl(out / "train.jsonl", demo_rows(48)), "eval": write_jsonl(out / "eval.jsonl", demo_rows(8, "eval"))}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process recipe builds its own Accelerator; accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def tiny_overrides(model_dir: Path, data: dict[str, Path], out: Path, **extra) -> list[str]:
    """Overrides that turn the default recipe into a fast tiny-model run."""
    values = {
        "model.path": str(model_dir),
        "data.train": f"[{{path: {data['train']}}}]",
        "data.eval": f"[{{path: {data['eval']}}}]",
        "data.max_seq_len": 256,
        "data.cache_dir": str(DATA_CACHE),
        "training.output_dir": str(out),
        "training.max_steps": 6,
        "training.micro_batch_size": 2,
        "training.learning_rate": 5e-3,
        "training.warmup_steps": 0,
        "training.scheduler": "constant",
        "logging.console": False,
        "model.dtype": "float32",  # as on this CPU, whatever the machine: the tests compare fp32 numbers
        "training.precision": "fp32",
        "logging.peak_flops": 1e11,  # spares every tiny run the start-up matmul measurement (tests/test_observability.py measures it)
        # glibc's settings are process-wide: in-process runs would leave them on for every later test in pytest's
        # process (tests/test_checkpoint.py's subprocess runs, and a probe in tests/test_performance.py, cover it).
        "training.reuse_host_memory": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
