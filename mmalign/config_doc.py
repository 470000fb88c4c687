"""The config reference, from the code: every field of a recipe's typed sections with its type, default, value and
docstring (the string literal written under the field, as litgpt documents its configs). One generator serves
``mmalign train CONFIG --show`` (a bound config's tree) and the documentation's config reference page
(``docs/hooks.py``), so the two cannot drift; ``tests/test_configs.py`` fails on a field without a docstring.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import lru_cache

from mmalign.config import to_dict


@lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field: docstring} of a dataclass, read from its source and its bases' (a string literal right after the
    field's annotated assignment)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def _type_name(tp) -> str:
    s = str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__
    return s.replace("NoneType", "None").replace("mmalign.train.sections.", "")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return to_dict(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return to_dict(f.default_factory())
    return "(required)"


def section_types(cls) -> dict[str, type]:
    """Fields of ``cls`` whose type is (optionally) another dataclass: the sub-sections."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if dataclasses.is_dataclass(args[0]):
            out[f.name] = args[0]
    return out


def rows(cls, value=None, prefix: str = "") -> list[dict]:
    """One row per leaf field of ``cls`` (recursing into sub-sections): key, type, default, value (when a bound
    ``value`` is given) and docstring."""
    hints, docs, subs = typing.get_type_hints(cls), field_docs(cls), section_types(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        v = getattr(value, f.name) if value is not None else None
        if f.name in subs and (value is None or v is not None):
            out.append({"key": key, "section": True, "doc": docs.get(f.name, ""), "type": subs[f.name].__name__,
                        "optional": type(None) in typing.get_args(hints[f.name])})
            out += rows(subs[f.name], v, key + ".")
            continue
        out.append({"key": key, "type": _type_name(hints[f.name]), "default": _default(f), "doc": docs.get(f.name, ""),
                    **({"value": to_dict(v)} if value is not None else {})})
    return out


def show(cfg) -> str:
    """A bound config as text: every field with its value (marked * where it differs from the default), the
    default and the docstring -- ``mmalign train CONFIG --show``."""
    lines = [f"{type(cfg).__name__} (recipe: {cfg.recipe})  -- * = set by the config or an override"]
    for r in rows(type(cfg), cfg):
        depth = r["key"].count(".")
        name = r["key"].rsplit(".", 1)[-1]
        pad = "  " * depth
        if r.get("section"):
            lines.append(f"{pad}{name}:" + (f"  # {r['doc']}" if r["doc"] else ""))
            continue
        mark = "*" if r["value"] != r["default"] else " "
        lines.append(f"{pad}{mark}{name}: {r['value']!r}  [{r['type']}; default {r['default']!r}]")
        if r["doc"]:
            lines += [f"{pad}    {x}" for x in textwrap.wrap(r["doc"], 100 - len(pad))]
    return "\n".join(lines)


def markdown(recipes: dict) -> str:
    """The documentation's config reference page: one table per recipe, every field with type, default, docstring."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["# Config reference", "",
           "Generated from the typed config sections (`mmalign/train/sections.py`) by `mmalign.config_doc` -- the "
           "same generator as `mmalign train CONFIG --show`. Keys are YAML paths; `key.path=value` overrides them on "
           "the command line.", ""]
    for name, cls in sorted(recipes.items()):
        out += [f"## `recipe: {name}`", "", " ".join((cls.__doc__ or "").split()), "",
                "| key | type | default | what |", "|---|---|---|---|"]
        for r in rows(cls):
            if r.get("section"):
                out.append(f"| **`{r['key']}`** | {r['type']}{' (optional)' if r['optional'] else ''} | | "
                           f"{cell(r['doc'])} |")
            else:
                out.append(f"| `{r['key']}` | `{cell(r['type'])}` | `{cell(r['default'])}` | {cell(r['doc'])} |")
        out.append("")
    return "\n".join(out)
