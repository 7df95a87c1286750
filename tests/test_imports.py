"""The import graph of src/kinship: no cycle, and the building blocks never import upward.

Layers, lowest first; a module may import its own layer and those below it, never above:
  0  errors, runtime, dispatch, sampling, checkpoint, config
  1  augment, losses, models, optim                 (building blocks that stand alone)
  2  blocks                                         (building blocks that may use augment's views)
  3  data                                           (stores and loaders, which use both)
  4  methods                                        (one file per method + the registry)
  5  assembly                                       (config + data + method + checkpoint, once)
  6  train, eval, bench                             (train and eval never import each other)
  7  cli
Every import counts, also one inside a function.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kinship"

LAYERS = {
    "errors": 0,
    "runtime": 0,
    "dispatch": 0,
    "sampling": 0,
    "checkpoint": 0,
    "config": 0,
    "augment": 1,
    "losses": 1,
    "models": 1,
    "optim": 1,
    "blocks": 2,
    "data": 3,
    "methods": 4,
    "assembly": 5,
    "train": 6,
    "eval": 6,
    "bench": 6,
    "cli": 7,
}


def module_name(path: Path) -> str:
    parts = ["kinship", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def top(name: str) -> str:
    return name.split(".")[1] if name != "kinship" else ""


def test_every_module_has_a_layer():
    assert {top(name) for name in import_graph()} - {""} <= set(LAYERS)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for name, targets in graph.items():
        for target in targets:
            a, b = top(name), top(target)
            if a and b and a != b and (LAYERS[b] > LAYERS[a] or LAYERS[a] == LAYERS[b] == LAYERS["train"]):
                wrong.append(f"{name} imports {target}")
    return wrong


def test_layers_import_only_downward():
    wrong = upward_imports(import_graph())
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_lazy_and_upward_imports(tmp_path, monkeypatch):
    """The rules would fail on the two faults they exist for: a function-level import counts."""
    fake = tmp_path / "kinship"
    (fake / "blocks").mkdir(parents=True)
    (fake / "methods").mkdir()
    for path in ("__init__.py", "blocks/__init__.py", "methods/__init__.py", "config.py"):
        (fake / path).write_text("")
    (fake / "blocks" / "x.py").write_text("def f():\n    from kinship.methods import y\n")
    (fake / "methods" / "y.py").write_text("from kinship.blocks import x\n")
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    graph = import_graph()
    assert "kinship.methods.y" in graph["kinship.blocks.x"]
    assert "kinship.blocks.x imports kinship.methods.y" in upward_imports(graph)
    try:
        test_no_import_cycle()
    except AssertionError as exc:
        assert "kinship.blocks.x" in str(exc)
    else:
        raise AssertionError("the cycle blocks.x -> methods.y -> blocks.x was not found")
