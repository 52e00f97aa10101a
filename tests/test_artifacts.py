"""Model archives: a plain tar hashed while written, and an export that wrote nothing is refused."""

from __future__ import annotations

import hashlib
import tarfile

import pytest

from workers import artifacts


def test_the_archive_holds_the_directory_and_its_hash_is_of_the_bytes_on_disk(tmp_path):
    source = tmp_path / "export"
    source.mkdir()
    (source / "model.safetensors").write_bytes(bytes(range(256)) * 4000)
    (source / "config.json").write_text('{"a": 1}')
    meta = artifacts.archive(tmp_path / "data", "job", "t0-g1-c2", source)
    path = tmp_path / "data" / "artifacts" / meta["path"]
    assert meta["path"] == "job/t0-g1-c2.tar" and path.stat().st_size == meta["size"]
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with tarfile.open(path) as tar:
        assert sorted(tar.getnames()) == ["t0-g1-c2/config.json", "t0-g1-c2/model.safetensors"]
        assert tar.extractfile("t0-g1-c2/model.safetensors").read() == bytes(range(256)) * 4000
    assert not list(path.parent.glob("*.partial"))


def test_an_export_that_wrote_nothing_is_an_error_not_an_empty_archive(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="wrote no files"):
        artifacts.archive(tmp_path / "data", "job", "c", tmp_path / "empty")
    assert not (tmp_path / "data" / "artifacts" / "job" / "c.tar").exists()
