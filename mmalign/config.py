"""YAML configs bound to typed dataclasses.

* ``read_config(path, overrides)`` reads YAML (``base: other.yaml`` inherits and deep-merges) and
  applies ``key.sub=value`` overrides (values parsed as YAML); ``config_from_dict(data, recipes)`` binds
  the result to the dataclass the ``recipe:`` key names in a recipe table. This module knows no recipe:
  ``mmalign.train.sections.load_config`` binds against the shipped recipes (``RECIPES``).
* Binding is strict: unknown keys, wrong types and missing required fields raise ``ConfigError``
  naming the dotted path and the valid choices.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config that cannot be bound; the message names the offending key path."""


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML itself keeps the last silently)."""


def _mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} given twice (first on line "
                              f"{seen[key]}); remove one")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_yaml(text: str, where: str = "<config>"):
    """Safe YAML (no ``!!python`` tags) with duplicate keys refused; every failure is one ``ConfigError``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config inheritance loop through {path}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        data = deep_merge(load_yaml(path.parent / base, _seen + (path,)), data)
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["train.lr=1e-4", "loss.name=ipo"]`` -> nested update; values are parsed as YAML scalars."""
    data = copy.deepcopy(data)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.path=value")
        key, raw = ov.split("=", 1)
        value = parse_yaml(raw, f"override {ov!r}") if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {ov!r}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return data


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def bind(tp: Any, value: Any, path: str = "") -> Any:
    """Convert ``value`` (parsed YAML) to type ``tp``, recursively and strictly."""
    where = path or "<root>"
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return bind(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]} ({'; '.join(errors)})")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and value not in choices and ("yes" if value else "no") in choices:
            value = "yes" if value else "no"  # YAML 1.1 reads no/off/yes/on as booleans
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [bind(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {bind(kt, k, path): bind(vt, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if hasattr(tp, "from_dict"):
            return tp.from_dict(value, path)
        return bind_dataclass(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads 1e-5 (no dot) as a string
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


def bind_dataclass(cls, value: Any, path: str = ""):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping for {cls.__name__}, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"{path or '<root>'}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in value:
            kwargs[name] = bind(hints[name], value[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key missing ({cls.__name__})")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ConfigError:
            raise
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{path or '<root>'}: {e}") from e
    return obj


def to_dict(obj) -> Any:
    """Dataclass -> plain YAML-able data (the inverse of ``bind``)."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def not_in(*artefacts: str, **kw):
    """A dataclass field that does not change the named derived artefacts (``not_in("reference")``: the frozen
    reference model's scores), so their keys (``keyed_fields``) leave it out. Declared with the field: a renamed
    field keeps its answer, and a new field is keyed until marked -- a missed mark costs a recomputation, never a
    stale table."""
    return dataclasses.field(metadata={"not_in": frozenset(artefacts)}, **kw)


def keyed_fields(obj, artefact: str) -> dict:
    """``to_dict`` of a dataclass less its fields marked ``not_in(artefact)``."""
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if artefact not in f.metadata.get("not_in", ())}


def read_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read, inherit (``base:``) and override a YAML config; plain data, not yet bound."""
    return apply_overrides(load_yaml(path), overrides or [])


def config_from_dict(data: dict, recipes) -> Any:
    if "recipe" not in data:
        raise ConfigError(f"config needs a 'recipe:' key; known recipes: {sorted(recipes)}")
    name = data["recipe"]
    if name not in recipes:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {sorted(recipes)}")
    return bind(recipes[name], data)
