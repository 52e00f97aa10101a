"""The CLI answers bad input with one clear line, never a traceback."""

from __future__ import annotations

import pytest

from darwinfront.cli import load_spec, main


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "a job spec is a mapping"),
        ("model: {source: builtin:tiny-llama}\nprune: {targets: [1.5]}\n", "prune.targets.0"),
        ("model: {source: builtin:tiny-llama}\nsearch: {generations: 0}\n", "search.generations"),
        ("model: {source: builtin:tiny-llama}\ncolour: blue\n", "colour"),
        ("model: {source: builtin:nope}\n", "unknown builtin model"),
        ("method: distill\nmodel: {source: builtin:tiny-llama}\n", "method"),
    ],
)
def test_bad_spec_files_give_one_line(tmp_path, capsys, text, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    assert main(["--url", "http://127.0.0.1:9", "--key", "k", "submit", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_spec_file(tmp_path, capsys):
    assert main(["--url", "http://127.0.0.1:9", "--key", "k", "submit", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_unreachable_server_is_one_line(capsys):
    assert main(["--url", "http://127.0.0.1:9", "--key", "k", "status"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach http://127.0.0.1:9" in err and "Traceback" not in err


def test_example_spec_is_valid():
    from darwinfront.cli import EXAMPLES

    spec = load_spec(EXAMPLES / "prune-tiny.yaml")
    assert spec.model.source == "builtin:tiny-llama" and spec.prune.targets == [0.3, 0.5]
