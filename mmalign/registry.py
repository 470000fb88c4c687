"""One registry type for every kind of named thing (losses, rewards, recipes).

A ``Registry`` is a plain ``dict`` whose missing-key error lists the known names, so
``LOSSES["dpo"]`` works like any dict and ``LOSSES["dop"]`` says what exists.
"""
from __future__ import annotations

from typing import Any, Callable


class Registry(dict):
    """``dict[str, obj]`` with a helpful ``KeyError`` and a ``register`` decorator."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def __missing__(self, key: Any):
        raise KeyError(f"unknown {self.kind} {key!r}; known names: {', '.join(sorted(self))}")

    def register(self, name: str, **attrs: Any) -> Callable:
        """Decorator: ``@REG.register("name", kind=...)`` stores the object and sets ``attrs`` on it."""

        def deco(obj):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            for k, v in attrs.items():
                setattr(obj, k, v)
            obj.registry_name = name
            self[name] = obj
            return obj

        return deco
