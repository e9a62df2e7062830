"""The package's layering, read from the source with `ast` (imports inside functions count too):
no import cycles, nothing imports against the layer order, DeepSpeed is imported by the engine
module only, and model/data code imports nothing distributed."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "beit_scale"

# Each layer may import itself and the layers it lists; nothing else in beit_scale.
ALLOWED = {
    "config": set(),
    "io": set(),
    "dist": set(),
    "models": {"config"},
    "data": {"config", "models", "io"},
    "scaling": {"config", "models", "data", "io", "dist"},
    "train": {"config", "models", "data", "io", "dist"},
}
ENGINE_MODULE = "beit_scale.train.engine"   # the one library module that imports DeepSpeed
CLI_MODULES = {"beit_scale.train.run", "beit_scale.viz"}  # entry points: nothing in the package imports them


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(f.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _imports(name: str, path: Path) -> list[str]:
    """Every absolute module name imported anywhere in the file (relative imports resolved)."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            found.append(base)
            found += [f"{base}.{a.name}" for a in node.names]
    return found


def _graph():
    mods = _modules()
    graph = {n: sorted({m for m in _imports(n, p) if m in mods and m != n}) for n, p in mods.items()}
    return mods, graph


def _layer(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    return part


def test_no_import_cycles():
    _, graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == "open":
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"
    for n in graph:
        if n not in state:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_follow_the_layer_order():
    _, graph = _graph()
    bad = []
    for n, deps in graph.items():
        layer = _layer(n)
        if layer not in ALLOWED:
            continue  # the package root
        for d in deps:
            dl = _layer(d)
            if dl and dl != layer and dl not in ALLOWED[layer]:
                bad.append(f"{n} imports {d} ({layer} may use {sorted(ALLOWED[layer]) or 'nothing'})")
            if d in CLI_MODULES:
                bad.append(f"{n} imports the entry point {d}")
    assert not bad, "\n".join(bad)


def test_deepspeed_is_imported_by_the_engine_module_only():
    mods = _modules()
    users = sorted(n for n, p in mods.items()
                   if any(m == "deepspeed" or m.startswith("deepspeed.") for m in _imports(n, p)))
    assert users == [ENGINE_MODULE], users


def test_models_and_data_import_nothing_distributed():
    mods = _modules()
    bad = [(n, m) for n, p in mods.items() if _layer(n) in ("models", "data")
           for m in _imports(n, p) if m.startswith(("deepspeed", "torch.distributed"))]
    assert not bad, bad


def test_the_checks_see_function_level_imports():
    """A guard on the guard: the train/export -> train/tasks import sits inside a function."""
    _, graph = _graph()
    assert "beit_scale.train.tasks" in graph["beit_scale.train.export"]
