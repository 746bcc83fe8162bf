"""The key of a token store: everything that changes its tokens, and nothing else.

It covers the source's identity (path, size, modification time, and a hash of its bytes, or of sampled blocks for
files over 64 MiB, so a changed file is caught without reading terabytes), the tokenizer (its whole serialised
vocabulary and rules, special tokens, chat template) and every data option that changes which examples are kept
or what their tokens and loss masks are. Packing, mixing and the held-out split work on the store's lengths
and are not part of it: changing them reuses the store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ftscale.config.data import DataConfig, DataSource
from ftscale.data.sources import load_hub_dataset, source_kind

FULL_HASH_LIMIT = 64 << 20
SAMPLE_BLOCKS, BLOCK = 16, 1 << 20  # 16 MiB read per large file
# Raise when tokenization changes what a store would hold for the same inputs: old stores then stop matching.
TOKENIZATION_VERSION = 1


def file_identity(path: Path) -> dict:
    st = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if st.st_size <= FULL_HASH_LIMIT:
            digest = hashlib.file_digest(f, "sha256")
        else:
            for k in range(SAMPLE_BLOCKS):  # evenly spaced blocks, the last one ending the file
                f.seek((st.st_size - BLOCK) * k // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(BLOCK))
    kind = "sha256" if st.st_size <= FULL_HASH_LIMIT else "sampled_sha256"
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, kind: digest.hexdigest()}


def source_identity(source: DataSource) -> dict:
    path, kind = Path(source.path), source_kind(source)
    if kind == "file":
        return {"file": str(path.resolve()), **file_identity(path)}
    if kind == "folder":
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"folder": str(path.resolve()), "files": {str(p.relative_to(path)): file_identity(p) for p in files}}
    return {"hub": source.path, "fingerprint": load_hub_dataset(source)._fingerprint}  # changes with its content


def _rules(tokenizer) -> object:
    """The tokenizer's vocabulary and rules. Padding and truncation are left out: transformers switches them on and
    off per call, and ftscale never pads or truncates through the tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return sorted(tokenizer.get_vocab().items())
    rules = json.loads(backend.to_str())
    rules.pop("padding", None)
    rules.pop("truncation", None)
    return rules


def tokenizer_identity(tokenizer) -> str:
    parts = {
        "class": type(tokenizer).__name__,
        "rules": _rules(tokenizer),
        "special": {str(k): str(v) for k, v in tokenizer.special_tokens_map.items()},
        "added": {t: i for t, i in sorted(tokenizer.get_added_vocab().items())},
        "chat_template": tokenizer.chat_template,
        "bos": [tokenizer.bos_token_id, bool(getattr(tokenizer, "add_bos_token", False))],
        "eos": tokenizer.eos_token_id,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def store_key(source: DataSource, cfg: DataConfig, tokenizer) -> tuple[str, dict]:
    """(key, what it covers): the key names the store folder and is checked against its manifest."""
    covers = {
        "source": source_identity(source),
        "format": source.format,
        "split": source.split,
        "tokenizer": tokenizer_identity(tokenizer),
        "options": {k: getattr(cfg, k) for k in ("max_seq_len", "overlong", "train_on", "on_error")},
        "tokenization_version": TOKENIZATION_VERSION,
    }
    return hashlib.sha256(json.dumps(covers, sort_keys=True).encode()).hexdigest()[:24], covers
