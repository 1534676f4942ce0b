"""Which of the package's source files a piece of code runs, and a hash of them.

One answer for two questions: which `src/fmnist/*.py` files a stage must list in dvc.yaml's
`deps` (a test checks every stage), and which code a train checkpoint or a tune study was made
by (their fingerprints include `code_digest`, so editing `sam.py` starts them anew instead of
resuming results computed by the old code). Imports are read from the source (AST), function-
level imports included, so nothing has to be imported to be counted.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "fmnist"
PACKAGE_DIR = Path(__file__).resolve().parent


def module_file(module: str) -> Path | None:
    """The file of `fmnist` or `fmnist.x` (None for other modules or names that are not files)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return PACKAGE_DIR / "__init__.py"
    path = PACKAGE_DIR.joinpath(*parts[1:])
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


ALL_NAMES = "*"  # `import fmnist` or `from fmnist import *`: any function of __init__ may run


def _absolute(node: ast.ImportFrom, path: Path) -> str | None:
    """The module a `from ... import` names; relative ones resolved inside the package."""
    if node.level == 0:
        return node.module
    try:
        package = [PACKAGE, *path.resolve().parent.relative_to(PACKAGE_DIR).parts]
    except ValueError:
        return None  # a relative import outside the package is not ours
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(nodes: list[ast.AST], path: Path) -> tuple[set[str], set[str]]:
    """(package modules imported anywhere under `nodes`, names imported from the package itself).

    `from fmnist import figures` imports a module; `from fmnist import load_model` a name
    defined in `fmnist/__init__.py`; importing `fmnist.a.b` imports `fmnist` and `fmnist.a` too.
    """
    modules: set[str] = set()
    names: set[str] = set()
    for node in (n for root in nodes for n in ast.walk(root)):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
            if PACKAGE in candidates:
                names.add(ALL_NAMES)
        elif isinstance(node, ast.ImportFrom) and (module := _absolute(node, path)):
            candidates = [module] + [f"{module}.{a.name}" for a in node.names]
            if module == PACKAGE:
                names.update(
                    ALL_NAMES if a.name == "*" else a.name
                    for a in node.names
                    if module_file(f"{PACKAGE}.{a.name}") is None
                )
        else:
            continue
        for name in candidates:
            parts = name.split(".")
            prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
            modules.update(prefix for prefix in prefixes if module_file(prefix) is not None)
    return modules, names


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@cache
def source_closure(entry: Path) -> tuple[Path, ...]:
    """`entry` and every package file it imports, directly or not, sorted.

    Imports inside functions count (a stage's main imports lazily), with one exception: a
    function of the package's `__init__.py` counts only where its name is imported (its lazy
    `load_model` would otherwise make every stage depend on the model-file modules).
    """
    init = PACKAGE_DIR / "__init__.py"
    seen: set[Path] = {Path(entry).resolve()}
    used_init_names: set[str] = set()
    scanned: dict[Path, frozenset[str]] = {}  # file -> the __init__ names it was scanned for

    def wanted(path: Path) -> frozenset[str]:
        return frozenset(used_init_names) if path == init else frozenset()

    while True:
        pending = [path for path in seen if scanned.get(path) != wanted(path)]
        if not pending:
            return tuple(sorted(seen))
        for path in pending:
            scanned[path] = wanted(path)
            tree = _parse(path)
            nodes: list[ast.AST] = [tree]
            if path == init and ALL_NAMES not in used_init_names:
                nodes = [node for node in tree.body
                         if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                         or node.name in used_init_names]
            modules, names = _imports(nodes, path)
            used_init_names |= names
            seen.update(file for file in map(module_file, modules) if file is not None)


def code_digest(module: str) -> str:
    """SHA-256 over the names and bytes of `module`'s file and everything it imports."""
    path = module_file(module)
    if path is None:
        raise ValueError(f"{module} is not a module of {PACKAGE}")
    digest = hashlib.sha256()
    for file in source_closure(path):
        digest.update(file.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()
