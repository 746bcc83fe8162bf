"""The training state a checkpoint holds, in one format for every backend: trainable parameters and their AdamW
state keyed by parameter name (so any number of processes and any backend can load them), and each rank's RNG.

The backends reach that state through a `StateAccess` (implemented in ftscale.distributed: whole tensors, DTensor
shards, or DeepSpeed's flat partitions); the helpers here read and write the torch optimizer's own layout."""

from __future__ import annotations

import json
import random
from typing import Protocol

import numpy as np
import torch
from torch import nn

SEP = "::"  # optimizer tensors are stored as "<parameter name>::<state key>"


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def owned_names(names: list[str], rank: int, world: int) -> list[str]:
    """The parameters rank `rank` writes: round-robin over sorted names, so every rank writes a similar share."""
    return [n for i, n in enumerate(sorted(names)) if i % world == rank]


def parameter_tensors(params: dict[str, nn.Parameter], names: list[str]) -> dict[str, torch.Tensor]:
    return {n: params[n].detach().cpu().contiguous() for n in names}


def optimizer_tensors(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        for key, value in optimizer.state.get(params[name], {}).items():
            out[f"{name}{SEP}{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu().contiguous()
    return out


def optimizer_groups(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> list[dict]:
    """Hyper-parameters of each param group, with the group's parameters by name."""
    by_id = {id(p): n for n, p in params.items()}
    return [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [by_id[id(p)] for p in g["params"]]} for g in optimizer.param_groups
    ]


def check_complete(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise KeyError(f"checkpoint has no values for {len(missing)} trainable parameters, first: {missing[0]}")


def restore_parameters(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    check_complete(params, tensors)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def restore_optimizer(
    optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], groups: list[dict]
) -> None:
    # Indices follow the live optimizer's own parameter order, which is what load_state_dict matches on.
    live_order = [p for g in optimizer.param_groups for p in g["params"]]
    name_of = {id(p): n for n, p in params.items()}
    index = {name_of[id(p)]: i for i, p in enumerate(live_order)}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, field = key.split(SEP)
        state.setdefault(index[name], {})[field] = value
    # load_state_dict pairs a group's saved ids with the live group's parameters by position, so the ids are listed
    # in live order whatever order the checkpoint names them in (DeepSpeed writes them sorted).
    saved_groups = [
        {
            **{k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"},
            "params": [index[name_of[id(p)]] for p in live["params"]],
        }
        for live, saved in zip(optimizer.param_groups, groups, strict=False)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": saved_groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states as tensors plus string metadata (safetensors metadata must be strings)."""
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    meta = {
        "python": json.dumps([py[0], list(py[1]), py[2]]),
        "numpy": json.dumps([np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]),
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter tensors; "step" is stored beside them


class StateAccess(Protocol):
    """How a checkpoint reads and restores the trainable state, whatever the backend. One implementation per
    backend (ftscale.distributed): the format on disk is the same for all of them. Every call is collective."""

    params: dict[str, nn.Parameter]  # the trainable parameters by name

    def collect(self, mine: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Whole values of the parameters named in `mine` and their optimizer state ("<name>::<key>")."""

    def groups(self) -> list[dict]:
        """The optimizer's param groups, parameters by name."""

    def restore(self, param_tensors: dict[str, torch.Tensor], optim_tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
        """Load whole values (every rank's shards together) into this run's parameters and optimizer."""
