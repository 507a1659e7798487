"""The house rules of docs/ARCHITECTURE.md, read from the source: imports run one way.

The import graph is built with ``ast`` from every module of ``kshot/`` (imports inside functions
count: a lazy import is still a dependency), and checked against the layer table of
docs/ARCHITECTURE.md, so the documented order is the enforced one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kshot"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported kshot module, names taken from it, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "kshot" or alias.name.startswith("kshot."):
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "kshot" or target.startswith("kshot.")):
                continue
            taken = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:  # `from kshot.services import distributed`: the submodule
                    found.append((sub, [], node.lineno))
                else:
                    taken.append(alias.name)
            if taken:
                found.append((target, taken, node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in imports_of(name, path, modules):
            assert target in modules, f"{name} imports {target}, which does not exist"
            if target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def documented_layers() -> list[tuple[str, list[str]]]:
    """The fenced block under '## Layers' in docs/ARCHITECTURE.md: ``layer  module ...`` lines,
    bottom first."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    match = re.search(r"^## Layers\n.*?^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    assert match, "docs/ARCHITECTURE.md has no fenced layer table under '## Layers'"
    layers = []
    for line in match.group(1).splitlines():
        words = line.split()
        if words and words[0] != "#":
            layers.append((words[0], words[1:]))
    return layers


def layer_of(module: str, layers: list[tuple[str, list[str]]]) -> tuple[int, str]:
    """(layer index, the table entry) of the longest entry that is ``module`` or a package of it."""
    best = None
    for i, (_, entries) in enumerate(layers):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):
                if best is None or len(entry) > len(best[1]):
                    best = (i, entry)
    assert best is not None, f"{module} is in no layer of docs/ARCHITECTURE.md; add it to the table"
    return best


def test_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_anywhere_in_kshot():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def violations(graph: dict[str, set[str]], layers: list[tuple[str, list[str]]]) -> list[str]:
    """Imports that go up the layer table, or across siblings of one layer."""
    wrong = []
    for source, targets in sorted(graph.items()):
        i, entry = layer_of(source, layers)
        for target in sorted(targets):
            j, target_entry = layer_of(target, layers)
            if j > i:
                wrong.append(f"{source} ({layers[i][0]}) imports {target} ({layers[j][0]}), a layer above it")
            elif j == i and entry != target_entry:
                wrong.append(f"{source} imports {target}: siblings in the {layers[i][0]} layer stay apart")
    return wrong


def test_imports_follow_the_documented_layers():
    layers = documented_layers()
    names = [n for n, _ in layers]
    assert names.index("errors") == 0 and names[-1] == "main", names
    wrong = violations(import_graph(), layers)
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_documented_layer():
    layers = documented_layers()
    for module in all_modules():
        layer_of(module, layers)


def test_no_private_name_is_borrowed_across_modules():
    modules = all_modules()
    borrowed = []
    for name, path in modules.items():
        for target, taken, line in imports_of(name, path, modules):
            for item in taken:
                if item.startswith("_") and not item.startswith("__") and target != name:
                    borrowed.append(f"{path.relative_to(ROOT)}:{line} takes {item} from {target}")
    assert not borrowed, "\n".join(borrowed)


def test_the_layer_check_catches_upward_and_sibling_imports():
    """The checker itself must fail on violations: data importing the trainer, one application
    importing another."""
    layers = [("errors", ["kshot.errors"]), ("data", ["kshot.data"]), ("apps", ["kshot.rl", "kshot.text"]),
              ("runs", ["kshot.runs"]), ("main", ["kshot.__main__"])]
    graph = {"kshot.data.omniglot": {"kshot.errors", "kshot.runs.train", "kshot.data.base"},
             "kshot.rl.envs": {"kshot.text.encoder"}, "kshot.runs.train": {"kshot.data.omniglot"}}
    wrong = violations(graph, layers)
    assert len(wrong) == 2
    assert "kshot.data.omniglot (data) imports kshot.runs.train (runs)" in wrong[0]
    assert "siblings" in wrong[1]


PUBLIC_API = [
    "ANIL", "ArrayDataset", "CheckpointError", "ConfigError", "DataError", "EvalResult", "FOMAML",
    "FewShotDataset", "KshotError", "LabelledDataset", "Learner", "MAML", "MetaSGD", "Omniglot",
    "PRESETS", "PairBatch", "PairSampler", "Predictor", "ProtoNet", "Reptile", "Siamese", "Task",
    "TaskSampler", "TrainConfig", "Trainer", "create_learner", "create_model", "evaluate",
    "evaluate_checkpoint", "fixed_tasks", "load_checkpoint", "load_dataset", "load_learner",
    "register_model", "resolve_config", "save_checkpoint", "train",
]


@pytest.mark.parametrize("name", PUBLIC_API)
def test_public_api_keeps_its_names(name):
    import kshot

    assert name in kshot.__all__ and getattr(kshot, name) is not None
    assert callable(getattr(kshot, name)) or isinstance(getattr(kshot, name), dict)
