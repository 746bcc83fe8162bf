"""A synthetic chat dataset of realistic shape, for the benches: 1-5 user/assistant turns, an optional system
prompt, and lengths spread log-normally from a few tokens to beyond a typical max_seq_len (instruction sets have
many short answers and a long tail). Deterministic for a seed."""

from __future__ import annotations

import json
import random
from pathlib import Path

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "an", "el", "is", "or", "un", "ba", "de", "fi", "go", "hu"]


def _words(rng: random.Random, vocabulary: list[str], median: int) -> str:
    n = max(1, int(rng.lognormvariate(0, 0.9) * median))
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def conversation(rng: random.Random, vocabulary: list[str]) -> dict:
    messages = [{"role": "system", "content": _words(rng, vocabulary, 12)}] if rng.random() < 0.3 else []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4, 5])):
        messages.append({"role": "user", "content": _words(rng, vocabulary, 25)})
        messages.append({"role": "assistant", "content": _words(rng, vocabulary, 45)})
    return {"messages": messages}


def write_dataset(path: Path, conversations: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    with path.open("w") as f:
        for _ in range(conversations):
            f.write(json.dumps(conversation(rng, vocabulary)) + "\n")
    return path
