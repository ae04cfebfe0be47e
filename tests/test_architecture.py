"""The layering holds: every import statement of every module points down ``hooks <- vectors <- core <- experiments
<- cli``, and no modules import each other in a cycle (lazy imports inside functions included). The backend contract
holds: only ``hooks/`` and the backends (``steering/backends/``) import the libraries that run models, every backend
in the registry meets ``steering.backends.protocol.Backend``, and no code outside the backends tests a backend's
name or a capability flag."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


# ---- the backend contract ------------------------------------------------------------------------------------------
MODEL_LIBRARIES = {"transformers", "vllm", "transformer_lens", "nnsight"}
INTERNALS_OK = ("hooks/", "steering/backends/")
# Model-file tools: they build the shipped models' files (convert the default GGUF, merge and train the organism's
# adapter) with transformers and never run steering; listed here by name so the exception stays visible.
MODEL_FILE_TOOLS = ("steering/default_model.py", "steering/organism.py", "experiments/organism/")
CAPABILITY_FLAGS = {"has_forward_pass", "continuous_batching", "has_readouts"}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def library_imports(path: Path) -> set[str]:
    """Top-level names of the model libraries ``path`` imports (module level and inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out & MODEL_LIBRARIES


def test_only_hooks_and_the_backends_import_model_libraries():
    against = [
        f"{_rel(path)} imports {', '.join(sorted(found))}"
        for path in modules().values()
        if (found := library_imports(path)) and not _rel(path).startswith(INTERNALS_OK + MODEL_FILE_TOOLS)
    ]
    assert not against, "model libraries imported outside hooks/ and steering/backends/:\n" + "\n".join(against)


def test_no_backend_names_or_capability_flags_outside_the_backends():
    """Capabilities are methods of the backend (``can_prefill``, ``batches_continuously`` ...), asked of the model or
    of ``model_class(name)``; nothing compares a backend's name (``backend == "vllm"``) or reads a flag."""
    from steering.backends import REGISTRY

    against = []
    for path in modules().values():
        rel = _rel(path)
        if rel.startswith("steering/backends/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                names = {s.value for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)}
                if names & set(REGISTRY):
                    against.append(f"{rel}:{node.lineno} compares with {sorted(names & set(REGISTRY))}")
            if isinstance(node, ast.Attribute) and node.attr in CAPABILITY_FLAGS:
                against.append(f"{rel}:{node.lineno} reads .{node.attr}")
            if isinstance(node, ast.Constant) and node.value in CAPABILITY_FLAGS:
                against.append(f"{rel}:{node.lineno} names {node.value!r}")
    assert not against, "backend names or capability flags outside steering/backends/:\n" + "\n".join(against)


def test_every_registered_backend_meets_the_protocol():
    from steering.backends import ENGINES, NAMES, REGISTRY, model_class
    from steering.backends.base import TextModel
    from steering.backends.protocol import Backend

    assert set(REGISTRY) == set(NAMES) | set(ENGINES)
    members = [name for name in vars(Backend) if not name.startswith("_")] + list(Backend.__annotations__)
    for name in REGISTRY:
        cls = model_class(name)
        assert issubclass(cls, TextModel) and cls.backend == name, name
        data = {"name", "tokenizer", "n_layers", "d_model", "dtype"}  # may be set per instance (``_init_text``)
        missing = [m for m in members if m not in data and not hasattr(cls, m)]
        assert not missing, f"{cls.__name__} lacks {missing}"
        for capability in ("can_prefill", "batches_continuously", "reads_while_generating"):
            assert isinstance(getattr(cls, capability)(), bool), (name, capability)
    assert model_class("hf").can_prefill() and not model_class("vllm").can_prefill()


def test_a_loaded_model_is_a_backend(tiny_chat):
    from steering.backends.errors import Unsupported
    from steering.backends.protocol import Backend, ScoringSession

    assert isinstance(tiny_chat, Backend)
    session = tiny_chat.prefill(tiny_chat.tokenizer("Hello there")["input_ids"])
    assert isinstance(session, ScoringSession) and session.tokens_processed > 0
    assert issubclass(Unsupported, ValueError)


def test_the_contract_checks_can_fail(tmp_path, monkeypatch):
    """A planted transformers import, backend-name comparison and capability flag in a core module are reported."""
    (tmp_path / "steering").mkdir()
    for rel in ("hooks/__init__.py", "vectors/__init__.py", "experiments/__init__.py", "steering/__init__.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    (tmp_path / "steering/leak.py").write_text(
        "def f(model):\n    from transformers import DynamicCache\n"
        "    return model.backend == 'vllm' or model.has_forward_pass\n"
    )
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    with pytest.raises(AssertionError, match="steering/leak.py imports transformers"):
        test_only_hooks_and_the_backends_import_model_libraries()
    with pytest.raises(AssertionError, match=r"leak.py:3 compares with \['vllm'\](.|\n)*reads .has_forward_pass"):
        test_no_backend_names_or_capability_flags_outside_the_backends()
