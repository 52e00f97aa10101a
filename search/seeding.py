"""Stable seeds for every random draw of a search.

Every draw comes from `random.Random(derive_seed(job_seed, target, generation, stage, ...))`, never from a
generator carried across calls, so a search gives the same candidates whatever order its evaluations finish
in, however many evaluators run them, and after a restore from a checkpoint.
"""

from __future__ import annotations

import hashlib

_SEPARATOR = b"\x1f"


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on `parts`, the same in every process and on every machine.

    Python's `hash()` is salted per process, so the seed comes from BLAKE2b over a typed encoding of the
    parts: `derive_seed(1)` and `derive_seed("1")` differ, and so do `("a", "b")` and `("ab",)`.

    Args:
        parts: ints (any size, negative allowed) and strings, in order.

    Returns:
        An int in [0, 2**63).

    Raises:
        TypeError: a part is neither an int nor a str (bools and floats are refused, to keep seeds exact).
    """
    encoded = []
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, int | str):
            raise TypeError(f"seed parts must be int or str, got {part!r} ({type(part).__name__})")
        tag = b"i" if isinstance(part, int) else b"s"
        encoded.append(tag + str(part).encode("utf-8").replace(b"\\", b"\\\\").replace(_SEPARATOR, b"\\x1f"))
    digest = hashlib.blake2b(_SEPARATOR.join(encoded), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
