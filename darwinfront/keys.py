"""`darwinfront keys create|list|revoke`: manage the API keys file on the server's host.

The file (`DARWINFRONT_API_KEYS_FILE`, default `<data_dir>/api_keys.json`) holds only SHA-256 hashes of keys
(`service.auth` reads, hashes and writes it). A key is shown once, when it is made; afterwards it is named by
its fingerprint, the first 12 hex digits of its hash. A running API picks up changes within a second.
"""

from __future__ import annotations

import argparse
import re
import sys

from pydantic import ValidationError

from darwinfront.core.errors import DarwinfrontError
from darwinfront.core.settings import Settings
from service.auth import generate_key, hash_key, read_keys_file, write_keys_file

FINGERPRINT = 12
_HEX = re.compile(r"^[0-9a-f]+$")


def fingerprint(digest: str) -> str:
    """How a stored key is named: the first 12 hex digits of its SHA-256 hash."""
    return digest[:FINGERPRINT]


def create(settings: Settings, tenant: str) -> tuple[str, str]:
    """Make a key for `tenant` and store its hash; returns (key, fingerprint). The key is not kept anywhere."""
    try:
        key = generate_key(settings, tenant=tenant)
    except ValueError as exc:
        raise DarwinfrontError(str(exc)) from None
    return key, fingerprint(hash_key(key))


def listing(settings: Settings, tenant: str | None = None) -> list[tuple[str, str]]:
    """(tenant, fingerprint) of every stored key, or of `tenant`'s, in file order."""
    tenants = _read(settings)
    return [(name, fingerprint(h)) for name, hashes in tenants.items() if tenant in (None, name) for h in hashes]


def revoke(settings: Settings, prefix: str, tenant: str | None = None) -> tuple[str, str]:
    """Remove the one key whose fingerprint starts with `prefix` (of `tenant`'s, when given).

    Returns:
        (tenant, fingerprint) of the revoked key.

    Raises:
        DarwinfrontError: The prefix is not hex, matches no key, or matches more than one.
    """
    prefix = prefix.strip().lower()
    if not _HEX.match(prefix):
        raise DarwinfrontError(f"fingerprint {prefix!r} is not hex digits; `darwinfront keys list` shows them")
    tenants = _read(settings)
    matches = [(name, h) for name, hashes in tenants.items() if tenant in (None, name) for h in hashes
               if h.startswith(prefix)]
    scope = f" of tenant {tenant!r}" if tenant else ""
    if not matches:
        raise DarwinfrontError(f"no key{scope} has a fingerprint starting {prefix!r} in {settings.keys_file}")
    if len(matches) > 1:
        names = ", ".join(f"{fingerprint(h)} ({name})" for name, h in matches)
        raise DarwinfrontError(f"fingerprint {prefix!r} is ambiguous: it starts {names}; give more digits")
    name, digest = matches[0]
    tenants[name].remove(digest)
    if not tenants[name]:
        del tenants[name]
    write_keys_file(settings.keys_file, tenants)
    return name, fingerprint(digest)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise DarwinfrontError(f"the server settings are not valid: {exc.errors()[0]['msg']}") from None


def _read(settings: Settings) -> dict[str, list[str]]:
    try:
        return read_keys_file(settings.keys_file)
    except ValueError as exc:
        raise DarwinfrontError(str(exc)) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `keys` command and its `create`, `list` and `revoke` subcommands."""
    p = sub.add_parser("keys", help="manage API keys in the keys file (create, list, revoke)")
    actions = p.add_subparsers(dest="keys_command", required=True)
    made = actions.add_parser("create", help="make a key (printed once; only its hash is stored)")
    made.add_argument("--tenant", default="local", help="the tenant the key acts for (default: local)")
    made.set_defaults(func=cmd_create)
    shown = actions.add_parser("list", help="tenants and key fingerprints (never keys)")
    shown.add_argument("--tenant", help="only this tenant's keys")
    shown.set_defaults(func=cmd_list)
    gone = actions.add_parser("revoke", help="remove the key with this fingerprint (prefix)")
    gone.add_argument("fingerprint", help="its fingerprint, or an unambiguous start of it")
    gone.add_argument("--tenant", help="only look among this tenant's keys")
    gone.set_defaults(func=cmd_revoke)


def cmd_create(args) -> int:
    settings = _settings()
    key, fp = create(settings, args.tenant)
    print(key)
    print(f"key {fp} for tenant {args.tenant!r} stored in {settings.keys_file}; it is shown only now",
          file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    settings = _settings()
    rows = listing(settings, args.tenant)
    for tenant, fp in rows:
        print(f"{tenant}\t{fp}")
    if not rows:
        print(f"no keys{f' of tenant {args.tenant!r}' if args.tenant else ''} in {settings.keys_file}", file=sys.stderr)
    return 0


def cmd_revoke(args) -> int:
    settings = _settings()
    tenant, fp = revoke(settings, args.fingerprint, args.tenant)
    print(f"revoked key {fp} of tenant {tenant!r}")
    return 0
