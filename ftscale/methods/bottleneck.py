"""Houlsby bottleneck adapters: down-projection, non-linearity, up-projection, with a skip connection, after the
attention block and after the MLP of every decoder layer.

peft has no such method, so it is written here. The adapters attach through forward hooks rather than by
replacing modules, so the base model's module tree and state-dict names stay exactly as they were."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftscale.config.method import BottleneckSection

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ATTENTION_NAMES = ("self_attn", "attention", "attn")
MLP_NAMES = ("mlp", "feed_forward")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """h -> h + up(act(down(h))); `up` starts at zero so the adapted model starts equal to the base."""

    def __init__(self, hidden_size: int, width: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden_size, width)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.weight.dtype)
        return (x + self.up(self.act(self.down(x)))).to(h.dtype)


def _adapt_output(adapter: BottleneckAdapter):
    def hook(_module, _args, output):
        if isinstance(output, tuple):  # attention returns (hidden, weights, ...)
            return (adapter(output[0]),) + output[1:]
        return adapter(output)

    return hook


def _sublayers(model: nn.Module, placement: list[str]) -> list[tuple[str, nn.Module]]:
    names = {"attention": ATTENTION_NAMES, "mlp": MLP_NAMES}
    wanted = tuple(n for p in placement for n in names[p])
    found = [(name, mod) for name, mod in model.named_modules() if name.rsplit(".", 1)[-1] in wanted and ".layers." in f".{name}"]
    if not found:
        raise ValueError(f"no decoder sub-layers named {wanted} found: bottleneck adapters need a decoder with .layers.N.{{self_attn,mlp}}")
    return found


class BottleneckModel(nn.Module):
    """The frozen base plus its adapters. Behaves like the base model for forward and generate."""

    def __init__(self, base: nn.Module, settings: BottleneckSection):
        super().__init__()
        self.base_model = base
        self.settings = settings
        hidden = base.config.hidden_size
        width = max(1, hidden // settings.reduction_factor)
        self.adapters = nn.ModuleDict()
        self._hooks = []
        for name, module in _sublayers(base, settings.placement):
            p = next(base.parameters())
            adapter = BottleneckAdapter(hidden, width, settings.activation).to(p.device)
            self.adapters[name.replace(".", "__")] = adapter
            self._hooks.append(module.register_forward_hook(_adapt_output(adapter)))
        for param in base.parameters():
            param.requires_grad_(False)

    @property
    def config(self):
        return self.base_model.config

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, **kwargs):
        self.base_model.gradient_checkpointing_enable(**kwargs)
        self.base_model.enable_input_require_grads()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.adapters.state_dict().items()}

    def save_pretrained(self, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """`state_dict`: this model's parameters by name (`adapters.*`), when the live ones are shards."""
        self.save_config(out_dir)
        tensors = (
            self.adapter_state_dict()
            if state_dict is None
            else {k.removeprefix("adapters."): v.contiguous() for k, v in state_dict.items() if k.startswith("adapters.")}
        )
        save_file(tensors, str(Path(out_dir) / WEIGHTS_NAME), metadata={"format": "pt", "method": "bottleneck"})

    def save_config(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "method": "bottleneck",
            "hidden_size": self.config.hidden_size,
            "num_adapters": len(self.adapters),
            "base_model_name_or_path": getattr(self.config, "_name_or_path", ""),
            **self.settings.model_dump(),
        }
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    def remove(self) -> nn.Module:
        """Detach the adapters and return the untouched base."""
        for h in self._hooks:
            h.remove()
        return self.base_model


def is_bottleneck_adapter(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / CONFIG_NAME).is_file()


def load_bottleneck(base: nn.Module, adapter_dir: str | Path) -> BottleneckModel:
    """Attach saved bottleneck adapters to `base`; a base of another size is refused with the mismatch named."""
    adapter_dir = Path(adapter_dir)
    meta = json.loads((adapter_dir / CONFIG_NAME).read_text())
    if meta["hidden_size"] != base.config.hidden_size:
        raise ValueError(
            f"{adapter_dir}: adapter was trained on hidden_size {meta['hidden_size']}, this base has {base.config.hidden_size}"
        )
    settings = BottleneckSection(**{k: meta[k] for k in BottleneckSection.model_fields})
    model = BottleneckModel(base, settings)
    state = load_file(str(adapter_dir / WEIGHTS_NAME))
    missing, unexpected = model.adapters.load_state_dict(state, strict=False)
    if missing or unexpected:
        model.remove()
        raise ValueError(f"{adapter_dir}: adapter does not fit this base (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model
