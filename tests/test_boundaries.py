"""The import boundaries between the project's rooms, checked on the source and on what importing it loads.

- The HTTP edge (`service/`) and the core load neither torch nor Ray, so the API image stays slim.
- `search/` imports neither torch, Ray nor Redis, so the search is testable in milliseconds. (optuna, which
  `search.nsga` uses, may load redis itself: the source is scanned, not `sys.modules`.)
- `search/` is the pure bottom beside the core's error tree: of the project it imports only
  `darwinfront.core.errors`, so the spec (`darwinfront.core.spec`) may read its strategy registry and schedules.
- `darwinfront/core/` imports nothing from the edges above it: `service`, `workers`, the CLI.
- Only the store's own modules import the key schema `darwinfront.core.keys`, and no other code spells a key.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("darwinfront", "service", "workers", "search", "benchmarks")  # everything outside tests
STORE_MODULES = {
    "darwinfront.core.store", "darwinfront.core.leases", "darwinfront.core.outputs", "darwinfront.core.census",
    "darwinfront.core.telemetry", "darwinfront.core.event_wait", "darwinfront.core.studies",
}
KEYS = "darwinfront.core.keys"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(*folders: str) -> dict[str, Path]:
    """module name -> path of every Python file under `folders` (relative to the repository root)."""
    return {_module_name(p): p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))}


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions: `from a import b` gives `a.b` when b is a
    module of the project, else `a`; relative imports are resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if _is_module(name) else base)
    return found


def _within(name: str, packages: set[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in packages)


def _loaded(packages: list[str]) -> set[str]:
    """Top-level names in `sys.modules` after a fresh interpreter imports every module of `packages`."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"for root in {packages!r}:\n"
        "    package = importlib.import_module(root)\n"
        "    for info in pkgutil.walk_packages(package.__path__, root + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(json.dumps(sorted({name.partition('.')[0] for name in sys.modules})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_the_http_edge_and_the_core_load_neither_torch_nor_ray() -> None:
    loaded = _loaded(["service", "darwinfront.core"])
    assert {"fastapi", "prometheus_client"} <= loaded  # the app and its routes were imported
    assert not loaded & {"torch", "ray"}, f"importing service/ and darwinfront/core/ loads {loaded & {'torch', 'ray'}}"


def test_the_search_loads_neither_torch_nor_ray() -> None:
    assert not _loaded(["search"]) & {"torch", "ray"}


def _importing(folder: str, packages: set[str]) -> list[str]:
    """`module: import` for every import of `packages` in the source under `folder`, lazy ones included."""
    return [f"{name}: {i}" for name, path in _sources(folder).items() for i in sorted(imports(path))
            if _within(i, packages)]


def test_the_http_edge_source_imports_neither_torch_nor_ray() -> None:
    assert not _importing("service", {"torch", "ray"}), "a lazy import would load them in the API image too"


def test_the_search_source_imports_neither_torch_ray_nor_redis() -> None:
    crossings = _importing("search", {"torch", "ray", "redis"})
    assert not crossings, f"search/ stays pure: {crossings}"


def _core_crossings() -> set[tuple[str, str]]:
    """(core module, what it imports) for every import of the core from `service`, `workers` or the modules of
    `darwinfront` outside the core (the CLI, the client, the stack)."""
    edges = {n for n in _sources("darwinfront") if n.count(".") == 1 and n != "darwinfront.core"}
    above = {"service", "workers", *edges}
    return {(name, i) for name, path in _sources("darwinfront/core").items() for i in imports(path)
            if _within(i, above)}


def test_the_core_imports_nothing_above_it() -> None:
    assert not _core_crossings(), "darwinfront/core/ imports from the edges above it"


def test_the_search_imports_only_the_error_tree_of_the_project() -> None:
    project = {"darwinfront", "service", "workers", "benchmarks"}
    crossings = {(name, i) for name, path in _sources("search").items() for i in imports(path)
                 if _within(i, project) and i != "darwinfront.core.errors"}
    assert not crossings, f"search/ stays below the core: {crossings}"


def test_only_the_store_imports_the_key_schema() -> None:
    importers = {name for name, path in _sources(*CODE).items() if KEYS in imports(path)}
    assert "darwinfront.core.store" in importers  # the scan sees `from darwinfront.core import keys`
    outside = sorted(importers - STORE_MODULES)
    assert not outside, f"{outside} import {KEYS}: ask the job store instead (darwinfront/core/store.py)"


def test_no_code_outside_the_key_schema_spells_a_key() -> None:
    spelled = [f"{path.relative_to(ROOT)}:{n}" for name, path in _sources(*CODE).items() if name != KEYS
               for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\bdf:", line)]
    assert not spelled, f"Redis keys spelled outside {KEYS}: {spelled}"
