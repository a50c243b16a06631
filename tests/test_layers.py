"""The package is built in layers that import only downward (docs/architecture.md).

Every import of the package's modules -- at module level or inside a function -- goes to
the same layer or a lower one, and the import drawing has no circle. A module that does
not belong to a layer below is a failure too, so a new sub-package is placed on purpose.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# bottom first; a module belongs to the first prefix it starts with
LAYERS = [
    ("metrics",),  # image-quality metrics: standalone, imports nothing of the harness
    ("bench.core", "bench"),  # errors, options, seeds, image layouts, package paths; bench/__init__
    ("bench.caching",),  # the caching-method interface, schedules, the methods
    ("bench.models",),  # loaders, pipelines, converter, the embedded model's data
    ("bench.sampling",),  # the denoising loop, the image store, generation
    ("bench.cost",),  # MACs, timing, a run's cost record
    ("bench.report",),  # records, tables, paper tables, the regression gate
    ("bench.run",),  # config schemas, checks, typed parts, runner, torchrun, sweeps, search
    ("hydra_plugins.deepcache_bench",),  # Hydra's sweeper plugins (thin: logic in bench.run)
    ("bench.cli", "bench.check", "bench.convert", "bench.store"),  # entry points
]


def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("bench", "metrics", "hydra_plugins"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if module == p or (module.startswith(p + ".") and p != "bench"):
                return i
    raise AssertionError(f"{module} belongs to no layer of tests/test_layers.py")


def _imports(module: str, source: str | None = None) -> set[str]:
    """The package's modules that ``module`` imports (resolved to the longest known module)."""
    path = MODULES[module]
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for n in names:
            while n and n not in MODULES:
                n = n.rpartition(".")[0]
            if n and n != module:
                out.add(n)
                break
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module):
    up = sorted(t for t in GRAPH[module] if layer(t) > layer(module))
    assert not up, f"{module} (layer {layer(module)}) imports upward: {up}"


def test_no_import_circle():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_check_sees_upward_imports():
    """The drawing itself: a local import of the runner in the engine, or a relative import
    out of a sub-package, is an edge to a higher layer."""
    src = "def f():\n    from bench.run.runner import run\n    from ..run import sweeper\n"
    edges = _imports("bench.caching.engine", src)
    assert edges == {"bench.run.runner", "bench.run.sweeper"}
    assert all(layer(t) > layer("bench.caching.engine") for t in edges)


# the Hydra schemas of bench/run/config.py, and the names the whole config travelled under
_CONFIG_TYPES = re.compile(r"\b(DictConfig|Config|ModelConfig|SamplerConfig|CacheConfig|RunSettings|MetricsConfig)\b")
_CONFIG_NAMES = re.compile(r"^[a-z]?cfg$")


def _config_parameters(source: str) -> list[str]:
    """``function(parameter)`` for each parameter that is a config by name or annotation."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is None:
                    continue
                note = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if _CONFIG_NAMES.match(arg.arg) or _CONFIG_TYPES.search(note):
                    out.append(f"{node.name}({arg.arg})")
    return out


def test_no_layer_below_the_run_layer_takes_the_config():
    """Below the run layer functions take typed parts (bench/run/parts.py), never the Hydra
    config or a section of it."""
    run = layer("bench.run")
    found = {m: _config_parameters(MODULES[m].read_text()) for m in MODULES if layer(m) < run}
    assert not {m: f for m, f in found.items() if f}


def test_the_config_check_sees_a_config_parameter():
    src = "def a(cfg): pass\ndef b(x, *, model: 'DictConfig'): pass\ndef c(spec: ModelSpec, cfg_doubled: bool): pass\n"
    assert _config_parameters(src) == ["a(cfg)", "b(model)"]
