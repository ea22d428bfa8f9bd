"""Opaque tokens and one-time codes: generated with ``secrets``, stored only as HMACs.

The HMAC (SHA-256 under a server key) is what the database holds and indexes; the plaintext exists
only in the response that hands it out. Comparisons of secrets use ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SESSION_TOKEN_BYTES = 24  # 192 bits
RESET_TOKEN_BYTES = 32  # 256 bits


def new_token(nbytes: int = SESSION_TOKEN_BYTES) -> str:
    return secrets.token_urlsafe(nbytes)


def digest(key: bytes, value: str, *, purpose: str) -> bytes:
    """HMAC-SHA256 of ``value``, domain-separated by ``purpose`` (a token of one kind never
    matches a stored HMAC of another kind)."""
    return hmac.new(key, purpose.encode() + b"\x00" + value.encode(), hashlib.sha256).digest()


def same(a: bytes | str, b: bytes | str) -> bool:
    """Constant-time equality."""
    if isinstance(a, str):
        a = a.encode()
    if isinstance(b, str):
        b = b.encode()
    return hmac.compare_digest(a, b)


def random_code(alphabet: str, length: int) -> str:
    """``length`` characters drawn uniformly from ``alphabet``: one draw below ``len**length``,
    written in that base (a single call to the system's random source, not one per character)."""
    base = len(alphabet)
    n = secrets.randbelow(base ** length)
    out = []
    for _ in range(length):
        n, i = divmod(n, base)
        out.append(alphabet[i])
    return "".join(out)
