"""``docs/architecture.md`` stays true: every module of ``src/d2f`` is listed there, every import (function-level
ones included) points along its layers or is one of its named exceptions, and no modules import each other in a
circle."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "d2f"
PAGE = (ROOT / "docs" / "architecture.md").read_text()


def _section(name: str) -> str:
    match = re.search(rf"<!-- {name}\b[^>]*-->(.*?)<!-- /{name} -->", PAGE, re.S)
    assert match, f"docs/architecture.md has no <!-- {name} --> section"
    return match.group(1)


def _layers() -> list[str]:
    """The layer names, in the order imports may point along."""
    return re.findall(r"^\d+\. (\w+):", _section("layers"), re.M)


def _exceptions() -> set[tuple[str, str]]:
    return set(re.findall(r"^- `([\w/]+\.py)` -> `([\w/]+\.py)`", _section("exceptions"), re.M))


def _modules() -> dict[str, Path]:
    """``d2f``'s modules by their path under ``src/d2f`` (the kernels, mapped in from ``kernels/``, are core)."""
    return {
        p.relative_to(PACKAGE).as_posix(): p
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.relative_to(PACKAGE).parts[0] != "kernels"
    }


def _layer(module: str) -> str:
    top = module.split("/")[0]
    if top in ("networks", "data", "training", "evaluation"):
        return top
    return "cli" if module in ("cli.py", "__main__.py") else "core"


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The d2f modules ``module`` imports anywhere in its code, as paths under ``src/d2f``."""
    package = module.split("/")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif node.module and node.module.split(".")[0] == "d2f":
                base = []
                node = ast.ImportFrom(module=".".join(node.module.split(".")[1:]) or None, names=node.names)
            else:
                continue
            target = base + (node.module.split(".") if node.module else [])
            candidates = [target, *(target + [alias.name] for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name.split(".")[1:] for alias in node.names if alias.name.split(".")[0] == "d2f"]
        else:
            continue
        for parts in candidates:
            for name in ("/".join(parts) + ".py", "/".join([*parts, "__init__.py"])):
                if name in modules and name != module:
                    found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {module: _imports(module, path, modules) for module, path in modules.items()}


def test_the_page_lists_every_module_and_no_other():
    listed = set(re.findall(r"^- `([\w/]+\.py)`", _section("modules"), re.M))
    assert listed == set(_modules()), {"not listed": set(_modules()) - listed, "gone": listed - set(_modules())}


def test_every_import_points_along_the_layers():
    layers, exceptions = _layers(), _exceptions()
    assert layers == ["core", "networks", "data", "training", "evaluation", "cli"]
    assert exceptions, "the page names its exceptions"
    graph = _graph()
    against = {
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if layers.index(_layer(target)) > layers.index(_layer(module))
    }
    assert against == exceptions, {"not allowed": against - exceptions, "no longer needed": exceptions - against}


def test_no_modules_import_each_other_in_a_circle():
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            pytest.fail("import circle: " + " -> ".join([*trail[trail.index(module) :], module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_checks_see_an_import_against_the_layers(tmp_path):
    """The import reader finds relative, absolute and function-level imports (a planted one in each form)."""
    modules = {"data/x.py": tmp_path / "x.py", "training/loop.py": None, "training/config.py": None}
    (tmp_path / "x.py").write_text(
        "from ..training import loop\n"
        "def f():\n"
        "    from d2f.training.config import TrainConfig\n"
        "    import d2f.training.loop\n"
    )
    assert _imports("data/x.py", tmp_path / "x.py", modules) == {"training/loop.py", "training/config.py"}


def test_cuda_only_tests_say_so_with_the_gpu_mark():
    """benchmarks/gpu.sh runs ``pytest -m gpu``: a test that skips itself without CUDA any other way would never
    run there (conftest.py skips the marked ones on a machine without CUDA)."""
    tests = Path(__file__).parent
    offenders = [
        p.name for p in sorted(tests.glob("test_*.py")) if re.search(r"skipif\(\s*not torch\.cuda", p.read_text())
    ]
    assert offenders == []
