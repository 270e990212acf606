"""YAML recipes and ``--section.key=value`` overrides into a validated :class:`~lmforge.config.Config`.

Unknown sections and keys, and values of the wrong type, are refused with a one-line
:class:`~lmforge.errors.LMForgeError` that names the fix.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from lmforge.config import PRESETS, SECTIONS, Config, ModelConfig
from lmforge.errors import LMForgeError

RECIPE_DIR = Path(__file__).parent / "configs"


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; strings from the command line are parsed."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except LMForgeError as e:
                errors.append(str(e))
        raise LMForgeError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is list:
        if isinstance(value, str):
            import yaml  # imported where YAML is read: `lmforge --help` needs only the field table

            parsed = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
            value = parsed
        if not isinstance(value, list):
            raise LMForgeError(f"{name} expects a list, got {value!r}; write it as [a, b] or a,b")
        return [_coerce(name, v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise LMForgeError(f"{name} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise LMForgeError(f"{name} expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise LMForgeError(f"{name} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise LMForgeError(f"{name} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise LMForgeError(f"{name} expects a string, got {value!r}")
    return value


def build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    """Construct a dataclass from a dict, refusing unknown keys and ill-typed values."""
    if not isinstance(values, dict):
        raise LMForgeError(f"section '{section}' must be a mapping of keys to values, got {values!r}")
    hints = _field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values = dict(values)
    if cls is ModelConfig and values.get("preset"):
        preset = values["preset"]
        if preset not in PRESETS:
            raise LMForgeError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values = {**PRESETS[preset], **values}
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            close = [k for k in known if k.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LMForgeError(
                f"unknown config key '{section}.{key}'{hint}; valid keys: {', '.join(known)}"
            )
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe is a path to a YAML file or the name of one in ``lmforge/configs``."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (RECIPE_DIR / name_or_path, RECIPE_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    names = sorted(x.stem for x in RECIPE_DIR.glob("*.yaml"))
    raise LMForgeError(f"recipe {name_or_path!r} not found; give a YAML path or one of: {', '.join(names)}")


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """``['--model.n_layer=4', 'train.lr=3e-4']`` -> ``{'model': {'n_layer': '4'}, 'train': {'lr': '3e-4'}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text or "." not in text.split("=", 1)[0]:
            raise LMForgeError(f"cannot read override {item!r}; write it as --section.key=value, e.g. --train.lr=3e-4")
        key, value = text.split("=", 1)
        section, sub = key.split(".", 1)
        if section not in SECTIONS:
            raise LMForgeError(f"unknown config section '{section}' in {item!r}; use one of {', '.join(SECTIONS)}")
        out.setdefault(section, {})[sub] = value
    return out


def load_config(recipe: str | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Read a recipe (name or path), apply ``--section.key=value`` overrides, validate everything."""
    raw: dict[str, Any] = {}
    if base:
        raw = {k: dict(v) for k, v in base.items()}
    if recipe:
        import yaml

        path = resolve_recipe(recipe)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise LMForgeError(f"recipe {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise LMForgeError(f"cannot read recipe {path} ({e.strerror}); give a readable YAML file") from None
        except yaml.YAMLError as e:
            raise LMForgeError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
        if not isinstance(loaded, dict):
            raise LMForgeError(f"recipe {path} must be a mapping with model/data/train/task sections")
        for section, values in loaded.items():
            if section not in SECTIONS:
                raise LMForgeError(f"unknown section '{section}' in {path}; use one of {', '.join(SECTIONS)}")
            if values is not None and not isinstance(values, dict):
                raise LMForgeError(f"section '{section}' of {path} must be a mapping of keys to values "
                                   f"(indented key: value lines under '{section}:'), got {values!r}")
            raw.setdefault(section, {}).update(values or {})
    for section, values in parse_overrides(overrides or []).items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    for section in raw:
        if section not in SECTIONS:
            raise LMForgeError(f"unknown config section '{section}'; use one of {', '.join(SECTIONS)}")
    try:
        return Config(**{s: build_section(cls, raw.get(s, {}), s) for s, cls in SECTIONS.items()})
    except TypeError as e:  # e.g. a dataclass validation tripping on a None
        raise LMForgeError(f"invalid configuration: {e}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")


def config_from_json(path: str | Path) -> Config:
    return config_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def field_help(cls: type) -> dict[str, str]:
    """The ``#:`` comment above each field, for ``--help`` output."""
    import inspect

    src = inspect.getsource(cls).splitlines()
    out, pending = {}, []
    for line in src:
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
        elif pending and ":" in s and not s.startswith(("def ", "@", '"""')):
            out[s.split(":", 1)[0].strip()] = " ".join(pending)
            pending = []
        else:
            pending = []
    return out
