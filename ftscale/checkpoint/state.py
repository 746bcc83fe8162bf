"""Collect and restore the training state a checkpoint holds: trainable parameters and their AdamW state (keyed
by parameter name, so any number of processes and any backend can load them), and each rank's RNG.

Three ways to reach that state, one format: `PlainAccess` (one process, DDP: every rank holds full tensors),
`FSDPAccess` (FSDP2: parameters and Adam state are DTensor shards) and `DeepSpeedAccess` (ZeRO-1/2/3: fp32 master
weights and Adam state live in flat partitions across ranks)."""

from __future__ import annotations

import json
import random

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
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [by_id[id(p)] for p in g["params"]]} for g in optimizer.param_groups]


def check_complete(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise KeyError(f"checkpoint has no values for {len(missing)} trainable parameters, first: {missing[0]}")


def restore_parameters(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    check_complete(params, tensors)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def restore_optimizer(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
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
        {**{k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"}, "params": [index[name_of[id(p)]] for p in live["params"]]}
        for live, saved in zip(optimizer.param_groups, groups)
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


class PlainAccess:
    """One process or DDP: full parameters and the torch optimizer's own state on every rank."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def collect(self, params: dict[str, nn.Parameter], mine: list[str]) -> tuple[dict, dict]:
        return parameter_tensors(params, mine), optimizer_tensors(self.optimizer, params, mine)

    def groups(self, params: dict[str, nn.Parameter]) -> list[dict]:
        return optimizer_groups(self.optimizer, params)

    def restore(self, params, param_tensors, optim_tensors, groups) -> None:
        restore_parameters(params, param_tensors)
        restore_optimizer(self.optimizer, params, optim_tensors, groups)


class DeepSpeedAccess:
    """ZeRO-1/2/3 through DeepSpeed's tensor-fragment API, which assembles and scatters one parameter's fp32 value
    and Adam state from the flat partitions. Every call is collective: all ranks walk all parameters in order."""

    def __init__(self, zero_optimizer, accelerator):
        self.zero, self.acc = zero_optimizer, accelerator

    def _inner_states(self) -> list[dict]:
        return [s for s in self.zero.optimizer.state.values() if s]

    @staticmethod
    def _full_shape(p: nn.Parameter) -> tuple[int, ...]:
        return tuple(getattr(p, "ds_shape", p.shape))

    def collect(self, params: dict[str, nn.Parameter], mine: list[str]) -> tuple[dict, dict]:
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
        )

        states = self._inner_states()
        step = states[0]["step"].detach().cpu().float().reshape(()) if states else torch.tensor(0.0)
        owned, param_out, optim_out = set(mine), {}, {}
        for name in sorted(params):
            p, shape = params[name], self._full_shape(params[name])
            value = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in OPTIMIZER_KEYS}
            if name in owned:
                param_out[name] = value.detach().cpu().reshape(shape).contiguous()
                for k, v in moments.items():
                    optim_out[f"{name}{SEP}{k}"] = v.detach().cpu().reshape(shape).contiguous()
                optim_out[f"{name}{SEP}step"] = step.clone()
        return param_out, optim_out

    def groups(self, params: dict[str, nn.Parameter]) -> list[dict]:
        names = sorted(params)
        return [{**{k: v for k, v in g.items() if k != "params"}, "params": names} for g in self.zero.optimizer.param_groups]

    def _create_optimizer_state(self) -> None:
        """Before the first step AdamW has no state to write into: torch creates it lazily at the first step, and
        DeepSpeed links its per-parameter views after that. Create it now, in torch's own layout, and link it."""
        flats = getattr(self.zero, "fp32_partitioned_groups_flat", None) or self.zero.single_partition_of_fp32_groups
        for flat in flats:  # ZeRO-3 / ZeRO-1,2 flat fp32 partitions of this rank
            state = self.zero.optimizer.state[flat]
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32, device=flat.device),
                             exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        if hasattr(self.zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: what DeepSpeed runs after step 1
            self.zero._lazy_init_hp_params_optimizer_state()

    def restore(self, params, param_tensors, optim_tensors, groups) -> None:
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        from ftscale.distributed.zero import gathered

        check_complete(params, param_tensors)
        self._create_optimizer_state()
        for name in sorted(params):
            p = params[name]
            safe_set_full_fp32_param(p, param_tensors[name].to(p.device))
            for k in OPTIMIZER_KEYS:
                safe_set_full_optimizer_state(p, optim_tensors[f"{name}{SEP}{k}"].to(p.device), k)
        # The fp32 masters are set; the parameters the model computes with must hold the same values.
        with gathered(list(params.values()), self.acc, modify=True), torch.no_grad():
            for name, p in params.items():
                p.data.copy_(param_tensors[name].reshape(p.shape).to(p.dtype))
        step = next(v for k, v in optim_tensors.items() if k.endswith(f"{SEP}step"))
        for state in self._inner_states():
            state["step"] = step.to(state["step"].dtype).reshape(state["step"].shape).to(state["step"].device)
        for live, saved in zip(self.zero.optimizer.param_groups, groups):
            live.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})


class FSDPAccess(PlainAccess):
    """FSDP2: each parameter and its Adam moments are DTensor shards. Gathered whole one parameter at a time (the
    adapter is small) so the format stays the same for every backend; every call is collective."""

    def collect(self, params: dict[str, nn.Parameter], mine: list[str]) -> tuple[dict, dict]:
        from ftscale.distributed.fsdp import full_tensor

        owned, param_out, optim_out = set(mine), {}, {}
        for name in sorted(params):
            value = full_tensor(params[name].detach())
            moments = {k: full_tensor(v) for k, v in self.optimizer.state.get(params[name], {}).items()}
            if name in owned:
                param_out[name] = value.cpu().contiguous()
                for k, v in moments.items():
                    optim_out[f"{name}{SEP}{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        return param_out, optim_out

    def restore(self, params, param_tensors, optim_tensors, groups) -> None:
        from ftscale.distributed.fsdp import shard_like

        check_complete(params, param_tensors)
        restore_parameters(params, {n: shard_like(param_tensors[n], p) for n, p in params.items()})
        # Moments are laid out like their parameter; the step count is a plain scalar.
        moments = {}
        for key, value in optim_tensors.items():
            name, field = key.split(SEP)
            moments[key] = shard_like(value, params[name]) if field in OPTIMIZER_KEYS else value
        restore_optimizer(self.optimizer, params, moments, groups)


def state_access(optimizer, accelerator, model: nn.Module) -> PlainAccess | FSDPAccess | DeepSpeedAccess:
    """The state access for this run's backend; `optimizer` is what accelerate.prepare returned."""
    from ftscale.distributed.fsdp import is_sharded
    from ftscale.distributed.zero import is_deepspeed

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> torch or DeepSpeed's optimizer
    if is_deepspeed(accelerator):
        return DeepSpeedAccess(inner, accelerator)
    return FSDPAccess(inner) if is_sharded(model) else PlainAccess(inner)
