"""The criteria catalog: every criterion is one module declaring its entries, read without importing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from darwinfront.core import criteria as catalog
from workers import criteria


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty criteria folder the catalog reads instead of workers/criteria/ (its cache cleared around it)."""
    monkeypatch.setattr(catalog, "package_dir", lambda: tmp_path)
    catalog.catalog.cache_clear()
    yield tmp_path
    catalog.catalog.cache_clear()


def test_the_spec_knows_every_criterion_without_importing_torch():
    code = ("import sys; from darwinfront.core.spec import JobSpec; from darwinfront.core import criteria;"
            "print(','.join(criteria.names())); assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip().split(",") == criteria.names()


def test_variants_are_one_class_with_their_defaults():
    assert catalog.entry("gate_fisher").defaults == {"stat": "fisher"}
    assert (criteria.get("gate_fisher").stat, criteria.get("gate_spsa").estimator) == ("fisher", "spsa")
    assert criteria.get("gate_spsa", probes=4).probes == 4  # keyword arguments reach the constructor
    assert {criteria.get(name).name for name in criteria.names()} == set(criteria.names())


def test_a_new_module_is_a_new_criterion(plugins: Path):
    (plugins / "mine.py").write_text('"""Mine: a test criterion."""\n\nCRITERIA = {"mine": {"class": "Mine", '
                                     '"supports": ["bias_compensation"]}}\n')
    (plugins / "_helpers.py").write_text('CRITERIA = {"hidden": {"class": "Hidden"}}\n')  # private: not read
    assert catalog.names() == ("mine",)
    entry = catalog.entry("mine")
    assert (entry.module, entry.cls, entry.summary) == ("workers.criteria.mine", "Mine", "Mine: a test criterion.")
    assert catalog.supporting("bias_compensation") == ("mine",)
    with pytest.raises(ValueError, match="unknown criterion 'snip'; known: mine"):
        catalog.entry("snip")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("CRITERIA = {'a': {'class': 'A'}}\nCRITERIA_B = 1\n", None),
        ("CRITERIA = dict(a=1)\n", "must be a literal dict"),
        ("CRITERIA = {'a': {'klass': 'A'}}\n", "needs an entry"),
        ("CRITERIA = {'a': {'class': 'A', 'supports': ['fast']}}\n", "declares \\['fast'\\]"),
    ],
)
def test_a_malformed_declaration_names_its_file(plugins: Path, source: str, message: str | None):
    (plugins / "bad.py").write_text(source)
    if message is None:
        assert catalog.names() == ("a",)
        return
    with pytest.raises(RuntimeError, match=message) as info:
        catalog.names()
    assert "bad.py" in str(info.value)


def test_two_modules_cannot_declare_one_name(plugins: Path):
    for stem in ("one", "two"):
        (plugins / f"{stem}.py").write_text("CRITERIA = {'same': {'class': 'Same'}}\n")
    with pytest.raises(RuntimeError, match="'same' is declared by both workers.criteria.one and two"):
        catalog.names()
