"""The package's structure, kept by a test: no import cycle between files (imports inside
functions count), no import of a layer above, no import of another module's private names.

The layers, lowest first (docs/internals.md explains each):

    base         errors, console, dist (DistContext), run_info (RunInfo), figures
    spec         the job spec
    components   models, data, tracking
    objectives   losses over a model's outputs (may use models)
    strategies   parallelism applied to a model
    checkpoint   run folders, resume plan, keeper, engines, weights (saves strategies' state)
    runtime      the worker: entry point, the loop
    launch       the driver: launchers, submit targets, the model lifecycle
    cli          the `temper` command
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "temper"

LAYERS: dict[str, int] = {
    "temper": 0, "errors": 0, "console": 0, "dist": 0, "run_info": 0, "figures": 0,
    "spec": 1,
    "models": 2, "data": 2, "tracking": 2,
    "objectives": 3,
    "strategies": 4,
    "checkpoint": 5,
    "runtime": 6,
    "launch": 7,
    "cli": 8,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("temper", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module file an imported dotted name lives in (the longest known prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every temper import, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "temper"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.split(".")[0] == "temper":
                found += [(base, a.name) for a in node.names]
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for base, name in _imports(module, path):
            target = _owner(f"{base}.{name}" if name and f"{base}.{name}" in MODULES else base)
            if target and target != module:
                edges[module].add(target)
    return edges


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "temper"
    if key not in LAYERS:
        pytest.fail(f"{module}: its package {key!r} has no layer; add it to LAYERS and docs/internals.md")
    return LAYERS[key]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_files() -> None:
    assert _cycles(_edges()) == []


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = sorted(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
                    for m, targets in _edges().items() for t in targets if _layer(t) > _layer(m))
    assert upward == []


def test_no_import_of_another_modules_private_names() -> None:
    private = sorted(f"{m} imports {base}.{name}" for m, path in MODULES.items()
                     for base, name in _imports(m, path)
                     if name and name.startswith("_") and not name.startswith("__"))
    assert private == []


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    """The checks above can fail: a made-up graph with a cycle and an upward edge."""
    edges = {"temper.spec.a": {"temper.runtime.loop"}, "temper.runtime.loop": {"temper.spec.a"}}
    assert _cycles(edges) == [["temper.runtime.loop", "temper.spec.a"]]
    assert _layer("temper.runtime.loop") > _layer("temper.spec.a")
    assert ("temper.dist", None) in _imports("temper.x", _write_probe())


def _write_probe() -> Path:
    import tempfile

    probe = Path(tempfile.mkdtemp()) / "probe.py"
    probe.write_text("def f():\n    import temper.dist\n")  # an import inside a function counts
    return probe


def test_every_model_with_a_tensor_parallel_plan_says_so_in_its_spec() -> None:
    """'This model supports tensor parallel' lives with the model (its plan); its spec names the
    sizes the plan splits, so validation can refuse a degree before anything starts."""
    import torch
    from pydantic import TypeAdapter

    from temper.models import MODEL_BUILDERS, build_model
    from temper.spec.architectures import TENSOR_PARALLEL_KINDS, ModelSpec

    assert TENSOR_PARALLEL_KINDS == ("gpt",)
    for kind in MODEL_BUILDERS:
        spec = TypeAdapter(ModelSpec).validate_python({"kind": kind})
        with torch.device("meta"):
            model = build_model(spec)
        has_plan = model.tensor_parallel_plan is not None
        assert has_plan == hasattr(spec, "tensor_parallel_dims"), kind
        assert has_plan == (kind in TENSOR_PARALLEL_KINDS), kind
