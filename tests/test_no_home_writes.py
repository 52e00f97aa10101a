"""Tests write nothing under HOME: the session (tests/conftest.py) points the data and cache directories, and
what else HOME would give, at its own folders; a subprocess (a driver, the CLI) inherits them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from darwinfront.core.settings import Settings, database_dir
from service.auth import generate_key


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*"))


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert Path.home() == home and Path("~").expanduser() == home
    return home


def test_the_session_sets_the_directories():
    assert os.environ["DARWINFRONT_DATA_DIR"] and os.environ["DARWINFRONT_CACHE_DIR"]
    assert Path(os.environ["DARWINFRONT_DATA_DIR"]).name == "data"  # this session's, never an outer one
    assert Settings().data_dir == Path(os.environ["DARWINFRONT_DATA_DIR"])


def test_settings_defaults_and_a_key_land_outside_home(fake_home: Path):
    settings = Settings()
    key = generate_key(settings, tenant="home-check")  # writes the default keys file under data_dir
    assert settings.keys_file.is_file() and key
    for path in (settings.data_dir, settings.cache_dir, settings.keys_file, settings.redis_dir, database_dir()):
        assert not path.is_relative_to(fake_home), path
    assert _files(fake_home) == []


def test_a_subprocess_writes_nothing_under_home(fake_home: Path):
    code = (
        "import json; from darwinfront.cli import DEFAULT_DATA_DIR; from darwinfront.keys import create;"
        "from darwinfront.core.settings import Settings, database_dir;"
        "s = Settings(); create(s, 'child');"
        "print(json.dumps([str(p) for p in (DEFAULT_DATA_DIR, s.keys_file, s.cache_dir, database_dir())]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    paths = [Path(p) for p in json.loads(done.stdout.splitlines()[-1])]
    assert paths[1].is_file()
    assert not any(p.is_relative_to(fake_home) for p in paths), paths
    assert _files(fake_home) == []
