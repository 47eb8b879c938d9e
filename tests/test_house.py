"""The shape of the code: imports run one way, functions stay short, the README's layout is the tree."""

import ast
import re
from pathlib import Path

import handler_fast

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "fastbackend"
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known}


def test_no_import_cycles():
    known = modules()
    # A package's __init__ is imported with any of its modules; an edge to a parent package is not a cycle.
    graph = {
        name: {m for m in imports_of(path, known) if not name.startswith(f"{m}.") and m != name}
        for name, path in known.items()
    }
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            assert state.get(other) != "open", "import cycle: " + " -> ".join([*trail, other])
            if other not in state:
                visit(other, [*trail, other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_function_over_sixty_lines():
    long = []
    for path in [*PACKAGE.rglob("*.py"), REPO / "handler_fast.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.name} ({lines} lines)")
    assert long == []


def test_readme_layout_names_every_devtool():
    block = (REPO / "README.md").read_text().split("## Layout")[1].split("```")[1]
    for path in (REPO / "devtools").glob("*.py"):
        if path.stem != "__init__":
            assert re.search(rf"\b{re.escape(path.name)}", block), (
                f"README layout does not mention devtools/{path.name}"
            )


def test_the_dispatch_table_points_only_into_the_request_modules():
    for kind, (_, target) in handler_fast.OPERATIONS.items():
        module, _, function = target.partition(":")
        assert module.startswith("fastbackend.api."), kind
        assert callable(handler_fast.resolve(target)), target
        assert function == kind, target


def test_the_training_core_knows_nothing_of_requests_or_runpod():
    known = modules()
    for name, path in known.items():
        if name.startswith("fastbackend.training"):
            text = path.read_text()
            assert not re.search(r"^\s*(import|from) runpod", text, re.M), name
            assert not {m for m in imports_of(path, known) if m.startswith(("fastbackend.api", "fastbackend.schemas"))}


def test_config_architectures_are_the_registered_families():
    from fastbackend.config import ARCH_ALIASES, ARCHES
    from fastbackend.training.families import FAMILIES

    assert set(ARCHES) == set(FAMILIES)
    assert set(ARCH_ALIASES.values()) <= set(FAMILIES)


def test_readme_layout_names_every_module_and_only_what_exists():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    block = layout.split("```")[1]
    for name, path in modules().items():
        shown = path.parent.name + "/" if path.name == "__init__.py" else path.stem
        assert re.search(rf"\b{re.escape(shown)}", block), f"README layout does not mention {name}"
    parents: list[Path] = []
    for line in block.strip().splitlines():
        entry = line.split()[0] if line.strip() else ""
        depth = (len(line) - len(line.lstrip())) // 2
        if depth <= 2 and entry.endswith(("/", ".py")) and entry == line[depth * 2 :].split()[0]:
            parents = parents[:depth]
            path = (parents[-1] if parents else REPO) / entry
            assert path.exists(), f"README layout lists {entry}, which is not in the tree"
            if entry.endswith("/"):
                parents.append(path)
