"""`darwinfront keys create|list|revoke` against the keys file a real API reads."""

from __future__ import annotations

import json
import stat
import time

import pytest

from darwinfront.cli import main
from darwinfront.core.settings import Settings
from service.auth import hash_key

pytest_plugins = ["service_fixtures"]


@pytest.fixture
def keys_file(service_settings: Settings, monkeypatch: pytest.MonkeyPatch):
    """The CLI pointed at the keys file of the `api_client` app."""
    monkeypatch.setenv("DARWINFRONT_API_KEYS_FILE", str(service_settings.keys_file))
    return service_settings.keys_file


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["keys", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_create_list_revoke_with_the_api(api_client, keys_file, capsys):
    code, out, err = run(capsys, "create", "--tenant", "gamma")
    key = out.strip()
    assert code == 0 and len(out.splitlines()) == 1 and key.startswith("df_") and len(key) >= 3 + 43  # 32 bytes
    digest = hash_key(key)
    assert json.loads(keys_file.read_text()) == {"tenants": {"gamma": [digest]}}  # only the hash is stored
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert digest[:12] in err and key not in err
    auth = {"Authorization": f"Bearer {key}"}
    assert api_client.get("/v1/jobs", headers=auth).status_code == 200

    run(capsys, "create", "--tenant", "delta")
    code, out, _ = run(capsys, "list")
    rows = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and rows[0] == ["gamma", digest[:12]] and [r[0] for r in rows] == ["gamma", "delta"]
    assert key not in out
    assert run(capsys, "list", "--tenant", "gamma")[1].splitlines() == [f"gamma\t{digest[:12]}"]

    code, out, _ = run(capsys, "revoke", digest[:8])
    assert code == 0 and f"revoked key {digest[:12]} of tenant 'gamma'" in out
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert list(json.loads(keys_file.read_text())["tenants"]) == ["delta"]
    time.sleep(1.1)  # the API re-reads the keys file at most once a second
    assert api_client.get("/v1/jobs", headers=auth).status_code == 401
    assert not list(keys_file.parent.glob("*.tmp"))  # the atomic write left no staging file


def test_revoke_refuses_unknown_ambiguous_and_non_hex(keys_file, capsys):
    digests = []
    while len({d[0] for d in digests}) == len(digests):  # until two fingerprints share a first digit
        run(capsys, "create", "--tenant", "t")
        digests = json.loads(keys_file.read_text())["tenants"]["t"]
    first = next(d[0] for d in digests if sum(e[0] == d[0] for e in digests) > 1)
    before = keys_file.read_text()

    code, _, err = run(capsys, "revoke", first)
    assert code == 2 and "ambiguous" in err and "give more digits" in err
    absent = next(c for c in "0123456789abcdef" if not any(d.startswith(c) for d in digests))
    code, _, err = run(capsys, "revoke", absent)
    assert code == 2 and f"no key has a fingerprint starting '{absent}'" in err
    code, _, err = run(capsys, "revoke", "xyz")
    assert code == 2 and "not hex" in err
    code, _, err = run(capsys, "revoke", digests[0][:12], "--tenant", "someone-else")
    assert code == 2 and "of tenant 'someone-else'" in err
    assert keys_file.read_text() == before  # nothing was revoked
    assert "Traceback" not in err


def test_list_of_no_keys_says_so(keys_file, capsys):
    code, out, err = run(capsys, "list")
    assert code == 0 and out == "" and f"no keys in {keys_file}" in err


def test_create_refuses_a_bad_tenant(keys_file, capsys):
    code, out, err = run(capsys, "create", "--tenant", "no spaces")
    assert code == 2 and out == "" and "tenant 'no spaces'" in err
    assert not keys_file.exists()


def test_placeholder_message_names_the_keys_command(monkeypatch):
    monkeypatch.setenv("DARWINFRONT_API_KEYS", json.dumps({"changeme": "alpha"}))
    with pytest.raises(ValueError, match=r"darwinfront keys create --tenant alpha"):
        Settings()
