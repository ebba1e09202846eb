"""The layering the folders promise, read from the source with `ast` (nothing is imported, so a broken layer cannot
hide behind an import error): one import name (`helip.`), each layer importing only the ones before it, and config
modules that `--help` and user code can import without torch, numpy or gRPC."""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Where each installed package's source lives (pyproject's [tool.setuptools] package-dir).
MS, TR = "helip.miner_service", "helip.trainer"
PACKAGE_DIRS = {"helip": ROOT / "helip", MS: ROOT / "miner_service", TR: ROOT / "trainer"}

# {layer: layers it must not import}; a layer may import the ones before it.
FORBIDDEN = {
    f"{MS}.core": [f"{MS}.wire", f"{MS}.service", f"{MS}.client"],
    f"{MS}.wire": [f"{MS}.service", f"{MS}.client"],
    f"{MS}.client": [f"{MS}.service"],
    f"{MS}.service": [f"{MS}.client"],
    MS: [TR],
    f"{TR}.pairs": [f"{TR}.tools", f"{TR}.app"],
    f"{TR}.tools": [f"{TR}.app"],
}

# Imported by `helip-train --help`, `helip.MiningConfig(...)` and the docs tooling: they must stay cheap.
LIGHT_MODULES = [
    "helip.trainer.pairs.mining_config",
    "helip.trainer.pairs.loss_config",
    "helip.trainer.tools.model_config",
    "helip.trainer.app.config",
    "helip.trainer.app.config_docs",
]
HEAVY = {"torch", "numpy", "grpc", "faiss", "redis", "open_clip", "deepspeed"}


@dataclass(frozen=True)
class Import:
    where: str  # file:line
    target: str  # absolute module name; for `from a import b`, `a.b` when that is a module of ours, else `a`

    def __str__(self) -> str:
        return f"{self.where} -> {self.target}"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def source_modules() -> dict[str, Path]:
    """{absolute module name: file} of every .py the wheel installs."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            # helip/ holds helip.miner_service and helip.trainer only through package-dir, never as folders.
            modules.setdefault(name, path)
    return modules


class ImportCollector(ast.NodeVisitor):
    """Every import of one module, resolved to absolute names; `if TYPE_CHECKING:` bodies never run, so are skipped.
    Function-local imports are collected like the rest: they run whenever the function does."""

    def __init__(self, module: str, is_package: bool, path: Path, known: set[str]):
        self.package = module if is_package else module.rpartition(".")[0]
        self.file = path.relative_to(ROOT)
        self.known = known
        self.found: list[Import] = []

    def add(self, node: ast.AST, target: str) -> None:
        self.found.append(Import(f"{self.file}:{node.lineno}", target))

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
        for child in node.orelse if name == "TYPE_CHECKING" else [*node.body, *node.orelse]:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.rsplit(".", node.level - 1)[0] if node.level > 1 else self.package
            base = f"{anchor}.{base}" if base else anchor
        submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in self.known]
        for target in submodules or [base]:
            self.add(node, target)


@pytest.fixture(scope="module")
def graph() -> dict[str, list[Import]]:
    """{module: its imports} for every module of ours."""
    modules = source_modules()
    imports = {}
    for name, path in modules.items():
        collector = ImportCollector(name, path.name == "__init__.py", path, set(modules))
        collector.visit(ast.parse(path.read_text(), str(path)))
        imports[name] = collector.found
    return imports


def top(module: str) -> str:
    return module.partition(".")[0]


def with_parents(module: str) -> list[str]:
    """What importing `module` runs: `a.b.c` runs a/__init__, a/b/__init__, then a/b/c."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def test_every_import_goes_through_helip(graph):
    bare = [str(i) for imports in graph.values() for i in imports if top(i.target) in ("trainer", "miner_service")]
    assert not bare, "import these as helip.trainer… / helip.miner_service…:\n" + "\n".join(bare)


@pytest.mark.parametrize("layer", FORBIDDEN)
def test_layers_import_only_the_ones_before_them(graph, layer):
    crossing = [
        str(i)
        for module, imports in graph.items()
        if within(module, layer)
        for i in imports
        if any(within(i.target, above) for above in FORBIDDEN[layer])
    ]
    assert not crossing, f"{layer} must not import {FORBIDDEN[layer]}:\n" + "\n".join(crossing)


@pytest.mark.parametrize("light", LIGHT_MODULES)
def test_config_modules_import_nothing_heavy(graph, light):
    assert light in graph, f"{light} is gone: update LIGHT_MODULES"
    # Breadth-first over our modules from `light` (and the packages it runs), remembering who imported whom.
    reached_from: dict[str, str | None] = dict.fromkeys(with_parents(light))
    queue = deque(reached_from)
    heavy = []
    while queue:
        module = queue.popleft()
        for i in graph.get(module, []):
            if top(i.target) in HEAVY:
                chain, step = [], module
                while step is not None:
                    chain.append(step)
                    step = reached_from[step]
                heavy.append(f"{i}  (via {' <- '.join(chain)})")
            for reached in with_parents(i.target):
                if reached in graph and reached not in reached_from:
                    reached_from[reached] = module
                    queue.append(reached)
    assert not heavy, f"{light} must import none of {sorted(HEAVY)}:\n" + "\n".join(heavy)


def test_helip_exports_resolve():
    import helip

    missing = []
    for name in helip.__all__:
        try:
            getattr(helip, name)
        except (AttributeError, ImportError) as error:
            missing.append(f"{name}: {error!r}")
    assert not missing, "\n".join(missing)
