"""API keys: made once, stored only as SHA-256 hashes, compared in constant time.

The keys file is JSON `{"tenants": {"<tenant>": ["<sha256 hex of key>", ...]}}` with mode 0600. Keys given in
`DARWINFRONT_API_KEYS` (plaintext key -> tenant) are hashed when read and checked the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from pathlib import Path

from darwinfront.core.settings import Settings

_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of a key, as stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys_file(path: Path) -> dict[str, list[str]]:
    """The keys file as tenant -> key hashes; empty when there is no file.

    Raises:
        ValueError: The file is not the documented shape.
    """
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text())
        tenants = document["tenants"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        shape = "{'tenants': {tenant: [sha256, ...]}}"
        raise ValueError(f"keys file {path} is not {shape}: {error}") from None
    if not isinstance(tenants, dict) or not all(
        isinstance(hashes, list) and all(isinstance(h, str) and _HEX64.match(h) for h in hashes)
        for hashes in tenants.values()
    ):
        raise ValueError(f"keys file {path}: each tenant must map to a list of sha256 hex digests")
    return tenants


def generate_key(settings: Settings, tenant: str = "local") -> str:
    """Make a new API key for `tenant`, store its hash in the keys file, and return the key (shown once).

    The file and its directory are created when missing; the file is written atomically with mode 0600.
    """
    if not _TENANT.match(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-64 letters, digits, '_', '.' or '-'")
    path = settings.keys_file
    tenants = read_keys_file(path)
    key = "df_" + secrets.token_urlsafe(32)
    tenants.setdefault(tenant, []).append(hash_key(key))
    write_keys_file(path, tenants)
    return key


def write_keys_file(path: Path, tenants: dict[str, list[str]]) -> None:
    """Replace the keys file with `tenants` atomically (a 0600 temporary file renamed over it).

    The directory is created (0700) when missing. Readers see the old file or the new one, never a part.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"tenants": tenants}, handle, indent=2)
    os.replace(staging, path)


class KeyRing:
    """Looks up the tenant of a key; re-reads the keys file when it changes on disk.

    Args:
        settings: Where the keys file is, and the keys from the environment.
        recheck_seconds: Look at the file's modification stamp at most this often (a `stat` per request
            costs more than the rest of the lookup on slow file systems); new keys work after this delay.
    """

    def __init__(self, settings: Settings, *, recheck_seconds: float = 1.0):
        self.settings = settings
        self.recheck_seconds = recheck_seconds
        self._env = [(hash_key(key), tenant) for key, tenant in settings.api_keys.items()]
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        self._file: list[tuple[str, str]] = []

    def _file_entries(self) -> list[tuple[str, str]]:
        now = time.monotonic()
        if now - self._checked < self.recheck_seconds:
            return self._file
        self._checked = now
        path = self.settings.keys_file
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            tenants = read_keys_file(path) if stamp else {}
            self._file = [(h, tenant) for tenant, hashes in tenants.items() for h in hashes]
            self._stamp = stamp
        return self._file

    def tenant_for(self, key: str) -> str | None:
        """The tenant owning `key`, or None for an unknown key."""
        if not key:
            return None
        digest = hash_key(key)
        found = None
        for stored, tenant in self._env + self._file_entries():
            # Compare against every entry, so timing says nothing about which one matched.
            if hmac.compare_digest(stored, digest) and found is None:
                found = tenant
        return found


def tenant_for(key: str, settings: Settings) -> str | None:
    """The tenant owning `key` under these settings, or None (reads the keys file now; `KeyRing` caches it)."""
    return KeyRing(settings, recheck_seconds=0).tenant_for(key)
