"""The house rules, checked: every module imports, the import graph has no circle and respects the layers,
internal imports live at the top of their module (or say why not), and every recipe implements the
written ``Recipe`` protocol."""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import mmalign
from mmalign.train.recipe import Recipe, RecipeBase
from mmalign.train.sections import RECIPES

PKG = Path(mmalign.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


MODULES = modules()


def internal_imports(name: str, path: Path):
    """(target module, at top level?, line, the source line) for every import of an mmalign module."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    src = path.read_text().splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                targets = [".".join(base + ([node.module] if node.module else []))]
            else:
                targets = [node.module or ""]
            targets += [f"{targets[0]}.{a.name}" for a in node.names if f"{targets[0]}.{a.name}" in MODULES]
        else:
            targets = [a.name for a in node.names]
        for t in targets:
            if not t.startswith("mmalign"):
                continue
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != name:
                yield t, id(node) in top, node.lineno, src[node.lineno - 1]


GRAPH = {m: {t for t, *_ in internal_imports(m, p)} for m, p in MODULES.items()}


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_import_graph_has_no_circle():
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


GROUND = ("mmalign.losses", "mmalign.registry", "mmalign.utils", "mmalign.config", "mmalign.paths",
          "mmalign.data.records", "mmalign.data.images", "mmalign.worlds", "mmalign.eval")
RECIPE_LAYER = ("mmalign.train", "mmalign.cli", "mmalign.demo")
PLUGINS = ("mmalign.toyworld", "mmalign.demo")


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_layers():
    """The core never imports recipes, the CLI or the app; nothing generic imports the toy world or the demo."""
    bad = []
    for m, targets in GRAPH.items():
        for t in targets:
            if under(m, GROUND) and (under(t, RECIPE_LAYER) or under(t, PLUGINS)):
                bad.append(f"{m} (core) imports {t}")
            if not under(m, PLUGINS + ("mmalign.cli",)) and under(t, PLUGINS):
                bad.append(f"{m} imports the plug-in {t}")
            if under(m, ("mmalign.losses",)) and not under(t, ("mmalign.losses", "mmalign.registry")):
                bad.append(f"{m} (loss core) imports {t}")
    assert not bad, "\n".join(bad)


def test_internal_imports_are_at_the_top_or_say_why():
    """An internal import inside a function must carry a reason: a comment on its line or the line above,
    or the module's own note (CLI commands keep library imports in run() so --help loads no torch)."""
    unexplained = []
    for m, path in MODULES.items():
        src = path.read_text()
        module_note = "imports are inside run()" in src or "Library imports are inside" in src
        lines = src.splitlines()
        for t, top, line, text in internal_imports(m, path):
            if top or module_note:
                continue
            if "#" in text or (line >= 2 and lines[line - 2].strip().startswith("#")):
                continue
            unexplained.append(f"{path.relative_to(PKG.parent)}:{line}: {text.strip()}")
    assert not unexplained, "internal imports inside functions without a reason:\n" + "\n".join(unexplained)


def recipe_classes():
    out = {}
    for name, cfg_cls in RECIPES.items():
        module = importlib.import_module(cfg_cls.runner.split(":")[0])
        cls = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, RecipeBase) and c.__module__ == module.__name__]
        assert cls, f"recipe {name!r}: no RecipeBase subclass in {module.__name__}"
        out[name] = cls[0]
    return out


@pytest.mark.parametrize("name,cls", sorted(recipe_classes().items()))
def test_every_registered_recipe_implements_the_protocol(name, cls):
    members = [m for m in dir(Recipe) if not m.startswith("_") and m not in ("train_data", "loss_fn")]
    for m in members:
        assert hasattr(cls, m), f"{cls.__name__} lacks {m}"
        proto, impl = getattr(Recipe, m), getattr(cls, m)
        if callable(proto) and not isinstance(inspect.getattr_static(Recipe, m), property):
            want = [p for p in inspect.signature(proto).parameters][1:]
            have = list(inspect.signature(impl).parameters)[1:]
            assert have[: len(want)] == want, f"{cls.__name__}.{m}{inspect.signature(impl)} vs protocol {want}"
    assert "compute" in cls.__dict__ or any("compute" in b.__dict__ for b in cls.__mro__[1:-1] if b is not RecipeBase)


def test_scripts_reach_the_demo_through_its_kit_not_its_app():
    """``scripts/`` use the demo world's experiment kit (``mmalign.demo.experiment``, ``.settings``), never the
    ``mmalign demo`` app's module (``mmalign.demo.run``), whose insides may change with the app."""
    bad = []
    for f in sorted((PKG.parent / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad += [f"{f.name}:{node.lineno} imports {n}" for n in names if n == "mmalign.demo.run"]
    assert not bad, "\n".join(bad)


def test_the_data_layer_imports_no_wing():
    """``mmalign.data`` (tables, images, prompts, text schemas) sits below every wing: it imports no model,
    recipe, reward or diffusion code (FiFA and DCPO captions, which score and caption image pairs, live in the
    diffusion wing)."""
    low = ("mmalign.data", "mmalign.paths", "mmalign.config", "mmalign.utils", "mmalign.registry", "mmalign.worlds")
    bad = [f"{m} imports {t}" for m, ts in GRAPH.items() if under(m, ("mmalign.data",))
           for t in ts if not under(t, low)]
    assert not bad, "\n".join(bad)


def test_one_warning_channel():
    """Warnings reach the user one way: a ``warning:`` line on stderr (or a table / report). No module keeps a
    ``logging`` logger beside it, whose messages nobody configured would see."""
    bad = [str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py") if "logging.getLogger(" in p.read_text()]
    assert not bad, bad


def test_binding_a_config_loads_no_model_library():
    """``mmalign.train.sections`` says so in its docstring: torch (the loss registry), never diffusers,
    transformers or peft."""
    import subprocess
    import sys

    code = ("import sys, mmalign.train.sections as s; s.load_config('configs/tiny/diffusion_dpo.yaml'); "
            "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
