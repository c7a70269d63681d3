"""The package's shape, kept: no import cycle between saelab's modules (module-level imports),
no function over 60 lines, no architecture-name branches outside sae/, and `import saelab`
stays cheap."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "saelab"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("saelab",) + (parts[:-1] if parts[-1] == "__init__" else parts))


def _import_graph() -> dict[str, set[str]]:
    trees = {_module(p): ast.parse(p.read_text()) for p in ROOT.rglob("*.py")}
    graph = {}
    for mod, tree in trees.items():
        deps = set()
        for node in tree.body:  # module level only: imports inside functions run later, by design
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saelab"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("saelab")}
        graph[mod] = {d for d in deps if d in trees and d != mod}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycles():
    graph = _import_graph()
    assert "saelab.sae.format" in graph and "saelab.sae.config" in graph["saelab.sae.format"]
    assert _cycle(graph) is None, _cycle(graph)
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the checker finds one


def test_no_function_over_60_lines():
    long = [(node.end_lineno - node.lineno + 1, f"{p.relative_to(ROOT)}:{node.lineno} {node.name}")
            for p in ROOT.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []


def test_architecture_names_are_branched_on_only_inside_sae():
    for p in ROOT.rglob("*.py"):
        if p.relative_to(ROOT).parts[0] != "sae":
            text = p.read_text()
            assert "cfg.arch ==" not in text and "arch !=" not in text and "arch in (" not in text, p


def test_import_saelab_is_cheap_and_the_public_api_resolves():
    code = ("import sys, saelab; heavy = [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules]; "
            "print(heavy, saelab.__version__ != '', saelab.SAE.__name__, saelab.load_lm.__name__, "
            "saelab.GroupTrainer.__name__, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True", "SAE", "load_lm", "GroupTrainer", "False"]
