"""The criteria catalog: which pruning criteria exist and what each declares, read without importing any of them.

A criterion is one module of `workers/criteria/` whose top level assigns a literal `CRITERIA` dict, name ->
entry, for example (`workers/criteria/gate.py`)::

    CRITERIA = {
        "gate": {"class": "Gate"},
        "gate_fisher": {"class": "Gate", "defaults": {"stat": "fisher"}},
    }

An entry names the class that scores (`class`), the constructor arguments of that variant (`defaults`, optional),
the job options it accepts (`supports`, optional: `bias_compensation`) and the constructor arguments a job may
set through `prune.criterion_options` (`options`, optional: name -> `{"type": "int" | "float", "min": .., "max": ..}`,
checked by `check_options`). The catalog reads those literals
with `ast`, so the job spec and the API, which never import torch, know every criterion from its file alone:
adding a criterion is adding its module. `workers.criteria.get` builds one from the same entries.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "workers.criteria"
DECLARATION = "CRITERIA"
OPTIONS = ("bias_compensation",)  # the job options (`prune.<option>`) a criterion may declare it supports
OPTION_TYPES = {"int": int, "float": float}  # what a tunable constructor argument (`options`) may be


@dataclass(frozen=True)
class CriterionEntry:
    """One registered criterion, as its module declares it.

    Attributes:
        name: what a job spec names it (`prune.criterion`).
        module: the module that implements it (`workers.criteria.gate`).
        cls: the class in that module that scores.
        defaults: constructor arguments of this variant (`{"stat": "fisher"}` for `gate_fisher`).
        supports: job options it accepts (see `OPTIONS`).
        summary: the first line of the module's docstring.
        options: constructor arguments a job may set (`prune.criterion_options`), name -> type and bounds.
    """

    name: str
    module: str
    cls: str
    defaults: dict
    supports: frozenset[str]
    summary: str
    options: dict = field(default_factory=dict)


def package_dir() -> Path:
    """The folder of the criteria modules, found without importing the package (it would import torch)."""
    spec = importlib.util.find_spec(PACKAGE.split(".")[0])
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {PACKAGE} package is not installed next to darwinfront")
    return Path(next(iter(spec.submodule_search_locations))) / PACKAGE.split(".")[1]


def read_declarations(path: Path) -> tuple[dict[str, dict], str]:
    """The literal `CRITERIA` dict a module assigns at its top level (empty when it assigns none), and the first
    line of its docstring."""
    tree = ast.parse(path.read_text(), filename=str(path))
    summary = (ast.get_docstring(tree) or "").split("\n")[0]
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == DECLARATION for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError as exc:
                raise RuntimeError(f"{path}: {DECLARATION} must be a literal dict ({exc})") from None
            if not isinstance(value, dict):
                raise RuntimeError(f"{path}: {DECLARATION} must be a dict of name -> entry")
            return value, summary
    return {}, summary


def _entry(name: str, raw: object, module: str, summary: str, path: Path) -> CriterionEntry:
    if not isinstance(raw, dict) or not isinstance(raw.get("class"), str):
        raise RuntimeError(f"{path}: criterion {name!r} needs an entry {{'class': '<ClassName>', ...}}")
    unknown = set(raw) - {"class", "defaults", "supports", "options"}
    supports = frozenset(raw.get("supports", ()))
    if unknown or not supports <= set(OPTIONS):
        raise RuntimeError(f"{path}: criterion {name!r} declares {sorted(unknown | (supports - set(OPTIONS)))}; "
                           f"an entry has class, defaults, supports (of {', '.join(OPTIONS)}) and options")
    options = raw.get("options", {})
    for option, rule in options.items() if isinstance(options, dict) else [(None, None)]:
        if not (isinstance(rule, dict) and rule.get("type") in OPTION_TYPES and {"min", "max"} <= set(rule)):
            raise RuntimeError(f"{path}: criterion {name!r} option {option!r} needs "
                               "{'type': 'int' | 'float', 'min': .., 'max': ..}")
    return CriterionEntry(name, module, raw["class"], dict(raw.get("defaults", {})), supports, summary, options)


@functools.cache
def catalog() -> dict[str, CriterionEntry]:
    """Every criterion the modules of `workers/criteria/` declare, by name (read once per process)."""
    found: dict[str, CriterionEntry] = {}
    for path in sorted(package_dir().glob("*.py")):
        if path.name.startswith("_"):
            continue
        declared, summary = read_declarations(path)
        for name, raw in declared.items():
            if name in found:
                raise RuntimeError(f"criterion {name!r} is declared by both {found[name].module} and {path.stem}")
            found[name] = _entry(name, raw, f"{PACKAGE}.{path.stem}", summary, path)
    return found


def names() -> tuple[str, ...]:
    """Registered criterion names, sorted."""
    return tuple(sorted(catalog()))


def entry(name: str) -> CriterionEntry:
    """The entry of criterion `name`.

    Raises:
        ValueError: `name` is not registered (the message lists those that are).
    """
    try:
        return catalog()[name]
    except KeyError:
        raise ValueError(f"unknown criterion {name!r}; known: {', '.join(names())}") from None


def supporting(option: str) -> tuple[str, ...]:
    """The criteria that accept job option `option` (one of `OPTIONS`), sorted."""
    return tuple(name for name in names() if option in catalog()[name].supports)


def check_options(name: str, options: dict) -> dict:
    """`options` for criterion `name`, checked against what its entry declares (ints stay ints, floats floats).

    Raises:
        ValueError: an option the criterion does not declare, of the wrong type or out of its bounds (the
            message names it and what is accepted).
    """
    declared = entry(name).options
    out = {}
    for option, value in options.items():
        if option not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise ValueError(f"criterion {name!r} has no option {option!r}; its options: {known}")
        rule = declared[option]
        kind = OPTION_TYPES[rule["type"]]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (kind is int and not isinstance(value, int)):
            raise ValueError(f"criterion {name!r} option {option!r} must be an {rule['type']}, got {value!r}")
        if not rule["min"] <= value <= rule["max"]:
            raise ValueError(f"criterion {name!r} option {option!r} must be in [{rule['min']}, {rule['max']}], "
                             f"got {value!r}")
        out[option] = kind(value)
    return out
