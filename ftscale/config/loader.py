"""Load a YAML recipe, apply `key.sub=value` overrides, and turn validation failures into actionable errors."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ftscale.config.root import FtscaleConfig
from ftscale.errors import FtscaleError, first_line


class ConfigError(FtscaleError, ValueError):
    """A config that cannot be used; the message names the file, line and key and says what to change."""


def _key_lines(text: str) -> dict[str, int]:
    """Map each dotted key path in a YAML document to its 1-based line number."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = f"{prefix}{key_node.value}"
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[f"{prefix}{i}"] = item.start_mark.line + 1
                walk(item, f"{prefix}{i}.")

    root = yaml.compose(text)
    if root is not None:
        walk(root, "")
    return lines


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value (for example training.learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or first_line(e)
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({problem}); quote the whole override for the shell and "
            'write lists and mappings in full, e.g. "data.train=[{path: my.jsonl}]"'
        ) from None


def apply_overrides(raw: dict, overrides: list[str]) -> set[str]:
    """Set each `a.b.c=value` into the nested dict (values are parsed as YAML); return the overridden key paths.
    A path through a key the file does not set starts from that key's default; a list index must exist
    (`data.train.0.path=x` changes the first source of a config that lists one)."""
    touched = set()
    for item in overrides:
        keys, value = _parse_override(item)
        node: Any = raw
        default: Any = FtscaleConfig().model_dump(mode="json")
        for k, nxt in zip(keys, [*keys[1:], None], strict=True):
            if isinstance(node, list):  # `data.train.0.path=x` indexes into a list of sources
                if not k.isdigit() or int(k) >= len(node):
                    raise ConfigError(f"override {item!r}: '{k}' is not an index of the {len(node)}-item list before it")
                k = int(k)
            has = k < len(default) if isinstance(default, list) and isinstance(k, int) else isinstance(default, dict) and k in default
            default = default[k] if has else None
            if nxt is None:
                node[k] = value
            else:
                if not isinstance(node[k] if isinstance(node, list) else node.get(k), (dict, list)):
                    node[k] = copy.deepcopy(default) if isinstance(default, (dict, list)) else {}
                node = node[k]
        touched.add(".".join(keys))
    return touched


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at `loc` (used to suggest the closest valid key)."""
    model: Any = FtscaleConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _pydantic_step(part) -> bool:
    """A step pydantic adds to an error's location (a validator, one choice of a union), not a config key."""
    return isinstance(part, str) and part.startswith(("function-after[", "literal["))


def _describe(err: dict, source: str, lines: dict[str, int], overridden: set[str]) -> str:
    raw, unknown = err["loc"], err["type"] == "extra_forbidden"  # an unknown key ends the location, whatever it reads
    loc = tuple(p for i, p in enumerate(raw) if (unknown and i == len(raw) - 1) or not _pydantic_step(p))
    key = ".".join(str(p) for p in loc)
    from_override = any(key == o or key.startswith(o + ".") for o in overridden)
    where = "command-line override" if from_override else (f"{source}:{lines[key]}" if key in lines else source)
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc)
        valid = list(owner.model_fields) if owner else []
        typed = str(loc[-1])
        # Close spelling first, then a shared prefix (`rank` -> `r`, `lr` -> `learning_rate` is out of reach).
        close = difflib.get_close_matches(typed, valid, n=1) or [v for v in valid if typed.startswith(v) or v.startswith(typed)][:1]
        hint = f"did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?" if close else f"valid keys here: {', '.join(valid)}"
        return f"{where}: unknown key '{key}': {hint}"
    if not key:  # a cross-section check
        return f"{where}: {err['msg'].removeprefix('Value error, ')}"
    return f"{where}: key '{key}': {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FtscaleConfig:
    """Read a recipe (or start from defaults when `path` is None), apply overrides, validate everything."""
    overrides = overrides or []
    source, text = "<defaults>", ""
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {source}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not a text (UTF-8) file: byte {e.start} cannot be decoded") from None
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(text) if text else {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model:, method:, data:, ...)")
    overridden = apply_overrides(raw, overrides)
    try:
        return FtscaleConfig.model_validate(raw)
    except ValidationError as e:
        problems = [_describe(err, source, lines, overridden) for err in e.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems)) from None


def render_config(cfg: FtscaleConfig) -> str:
    """The resolved config as YAML, each key followed by its one-line description as a comment."""
    out: list[str] = []

    def emit(model: BaseModel, indent: int) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            pad = "  " * indent
            note = f"  # {field.description}" if field.description else ""
            if isinstance(value, BaseModel):
                out.append(f"{pad}{name}:{note}")
                emit(value, indent + 1)
            elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
                out.append(f"{pad}{name}:{note}")
                for item in value:
                    dumped = yaml.safe_dump(item.model_dump(), default_flow_style=True, width=10**6).strip()
                    out.append(f"{pad}  - {dumped}")
            else:
                if isinstance(value, tuple):
                    value = list(value)
                dumped = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
                out.append(f"{pad}{name}: {dumped}{note}")

    emit(cfg, 0)
    return "\n".join(out) + "\n"
