"""Exact match during training: held-out examples answered greedily by the model being trained, scored as
`ftscale compare` scores them. The prompt is an example's tokens up to its last span of loss tokens, and that
span is the reference answer, so chat, prompt/completion and multi-turn data all work from the token store."""

from __future__ import annotations

import numpy as np
import torch

from ftscale.data.rows import StoreRows
from ftscale.evaluation.compare import exact_match


def prompts_and_answers(rows: StoreRows, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt ids, reference answer ids) of the first `count` held-out examples that have an answer."""
    pairs = []
    for j in range(len(rows.examples)):
        if len(pairs) == count:
            break
        ids, mask = rows.example(j)
        answer = np.flatnonzero(mask)
        if not len(answer):
            continue
        gaps = np.flatnonzero(np.diff(answer) > 1)
        start = int(answer[gaps[-1] + 1] if len(gaps) else answer[0])
        if start >= 2:  # a prompt of at most a BOS token: the loss covers the whole example (text data, train_on all)
            pairs.append((ids[:start], ids[start : int(answer[-1]) + 1]))
    return pairs


@torch.no_grad()
def count_exact_matches(model, tokenizer, pairs, shard: range, max_new_tokens: int, device, synced: bool) -> tuple[int, int]:
    """(matches, answers) over this rank's `shard` of `pairs`. `synced`: every rank keeps calling the model until all
    are done (transformers' synced_gpus), as sharded backends need the same number of forwards on every rank; a rank
    with a shorter shard answers its first prompt again and does not count it."""
    batch, matches, answered = 8, 0, 0
    per_rank = len(range(0, len(pairs), shard.step)) if synced else len(shard)
    for first in range(0, per_rank, batch):
        chosen = [shard[i] if i < len(shard) else None for i in range(first, min(first + batch, per_rank))]
        prompts = [pairs[0 if i is None else i][0] for i in chosen]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding: generation continues from the right edge
            ids[r, width - len(p) :], attention[r, width - len(p) :] = torch.from_numpy(p.astype(np.int64)), 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced,
        )
        answers = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i, answer in zip(chosen, answers, strict=True):
            if i is not None:
                reference = tokenizer.decode(pairs[i][1], skip_special_tokens=True)
                matches += exact_match(answer, reference)
                answered += 1
    return matches, answered
