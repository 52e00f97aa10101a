"""Model archives: a plain tar written once by the exporter and moved into the job's folder; copied and hashed
when it must travel; an export that wrote nothing is refused."""

from __future__ import annotations

import errno
import hashlib
import os
import tarfile

import pytest

from workers import artifacts, transfer

PAYLOAD = bytes(range(256)) * 4000


class _Bytes:
    """A streamed file of known bytes (what `SafetensorsPlan` is to `pack`), handed out in uneven chunks."""

    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def chunks(self):
        view = memoryview(self.data)
        yield from (view[i : i + 7777] for i in range(0, self.size, 7777))


def _export(tmp_path, name: str = "t0-g1-c2"):
    """An export folder as an evaluator leaves it: `<name>.tar` of a config file and streamed weights."""
    small, folder = tmp_path / "small", tmp_path / "export"
    small.mkdir()
    folder.mkdir()
    (small / "config.json").write_text('{"a": 1}')
    artifacts.pack(small, folder / f"{name}.tar", name=name, streamed={"model.safetensors": _Bytes(PAYLOAD)})
    return transfer.Located(None, str(folder))


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path, "r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_a_packed_archive_holds_the_folder_and_the_streamed_bytes(tmp_path):
    source = _export(tmp_path)
    members = _members(os.path.join(source.path, "t0-g1-c2.tar"))
    assert members == {"t0-g1-c2/config.json": b'{"a": 1}', "t0-g1-c2/model.safetensors": PAYLOAD}
    assert os.listdir(source.path) == ["t0-g1-c2.tar"]  # no partial file left


def test_an_archive_on_this_filesystem_is_moved_into_place_and_hashed_later(tmp_path):
    source = _export(tmp_path)
    packed = hashlib.sha256((tmp_path / "export" / "t0-g1-c2.tar").read_bytes()).hexdigest()
    meta = artifacts.take_exported(tmp_path / "data", "job", "t0-g1-c2", source.to_dict())
    path = tmp_path / "data" / "artifacts" / meta["path"]
    assert meta == {"path": "job/t0-g1-c2.tar", "size": path.stat().st_size, "sha256": None, "files": 2}
    assert hashlib.sha256(path.read_bytes()).hexdigest() == packed  # the same bytes, not rewritten
    assert not (tmp_path / "export").exists()  # the export folder is deleted once taken


def test_an_archive_that_must_travel_is_copied_and_hashed_as_it_arrives(tmp_path, monkeypatch):
    source = _export(tmp_path)
    packed = (tmp_path / "export" / "t0-g1-c2.tar").read_bytes()
    real = os.replace

    def across_filesystems(src, dst):
        if str(src).endswith(".tar"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", across_filesystems)
    meta = artifacts.take(tmp_path / "data", "job", "t0-g1-c2", source)
    path = tmp_path / "data" / "artifacts" / meta["path"]
    assert path.read_bytes() == packed and meta["sha256"] == hashlib.sha256(packed).hexdigest()
    streamed = artifacts.take(tmp_path / "data", "again", "t0-g1-c2", source, through_ray=True)
    assert streamed["sha256"] == meta["sha256"] and (tmp_path / "export" / "t0-g1-c2.tar").is_file()


def test_an_export_that_wrote_nothing_is_an_error_not_an_empty_archive(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="wrote no files"):
        artifacts.archive(tmp_path / "data", "job", "c", tmp_path / "empty")
    with pytest.raises(RuntimeError, match="wrote no archive"):
        artifacts.take(tmp_path / "data", "job", "c", transfer.Located(None, str(tmp_path / "empty")))
    assert not list((tmp_path / "data" / "artifacts" / "job").iterdir())


def test_a_streamed_file_that_comes_short_leaves_no_archive(tmp_path):
    class Short(_Bytes):
        def chunks(self):
            yield self.data[:100]

    (tmp_path / "small").mkdir()
    with pytest.raises(OSError):
        artifacts.pack(tmp_path / "small", tmp_path / "c.tar", name="c", streamed={"w": Short(PAYLOAD)})
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*partial"))
