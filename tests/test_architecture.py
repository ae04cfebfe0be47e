"""The layering holds: every import statement of every module points down ``hooks <- vectors <- core <- experiments
<- cli``, and no modules import each other in a cycle (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Import name -> folder, as pyproject's package-dir installs them.
PACKAGES = {"steering.hooks": "hooks", "steering.vectors": "vectors", "steering.experiments": "experiments"}
LAYERS = ("steering.hooks", "steering.vectors", "steering", "steering.experiments", "steering.cli")


def modules() -> dict[str, Path]:
    """Every module of the ``steering`` namespace and its file."""
    found = {}
    roots = {"steering": ROOT / "steering", **{name: ROOT / folder for name, folder in PACKAGES.items()}}
    for package, folder in roots.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that ``path`` imports (module-level and inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def layer(module: str) -> int:
    """Index in ``LAYERS`` of the layer a module belongs to (the longest matching prefix)."""
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS.index(best)


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_the_module_list_is_complete():
    names = set(modules())
    assert {"steering.hooks.plan", "steering.vectors.extract", "steering.sweep", "steering.cli.run"} <= names
    assert "steering.experiments.quickstart" in names


def test_imports_point_down_the_layers():
    against = [
        f"{src} ({LAYERS[layer(src)]}) imports {dst} ({LAYERS[layer(dst)]})"
        for src, targets in graph().items()
        for dst in targets
        if layer(dst) > layer(src)
    ]
    assert not against, "imports against the layers:\n" + "\n".join(sorted(against))


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """A planted arrow against the layers and a planted cycle are both reported."""
    src = {
        "steering/a.py": "from steering.cli import main\nfrom steering import b\n",
        "steering/b.py": "def f():\n    from steering import a\n",
        "steering/cli/__init__.py": "",
        "hooks/__init__.py": "",
        "vectors/__init__.py": "",
        "experiments/__init__.py": "",
        "steering/__init__.py": "",
    }
    for rel, text in src.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    edges = graph()
    assert "steering.cli" in edges["steering.a"] and layer("steering.cli") > layer("steering.a")
    assert "steering.a" in edges["steering.b"] and "steering.b" in edges["steering.a"]
