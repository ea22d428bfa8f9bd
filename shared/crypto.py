"""Sealing secrets that must travel on Kafka (authenticated encryption, AES-256-GCM).

A sealed value is ``v1.<key id>.<nonce>.<ciphertext>`` (urlsafe base64 parts). The associated data
binds it to its context (for a reset token: the account id), so a sealed token copied into another
event does not open. Keys come from configuration as ``id:base64key`` pairs; the first one seals,
all of them open, so a key can rotate.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class SealError(ValueError):
    pass


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def parse_keys(spec: str) -> dict[str, bytes]:
    """Parse ``id:key[,id:key...]``; keys are 32 bytes, urlsafe base64."""
    keys: dict[str, bytes] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        kid, _, b64 = part.partition(":")
        if not kid or not b64:
            raise ValueError("seal keys must look like id:base64key")
        raw = _unb64(b64)
        if len(raw) != 32:
            raise ValueError(f"seal key {kid!r} must be 32 bytes")
        keys[kid] = raw
    if not keys:
        raise ValueError("no seal key configured")
    return keys


class Sealer:
    def __init__(self, spec: str) -> None:
        self.keys = parse_keys(spec)
        self.current = next(iter(self.keys))

    def seal(self, plaintext: str, *, context: str) -> str:
        nonce = os.urandom(12)
        ct = AESGCM(self.keys[self.current]).encrypt(nonce, plaintext.encode(), context.encode())
        return f"v1.{self.current}.{_b64(nonce)}.{_b64(ct)}"

    def open(self, sealed: str, *, context: str) -> str:
        try:
            version, kid, nonce, ct = sealed.split(".")
            if version != "v1" or kid not in self.keys:
                raise SealError("unknown seal version or key")
            return AESGCM(self.keys[kid]).decrypt(_unb64(nonce), _unb64(ct), context.encode()).decode()
        except (ValueError, InvalidTag) as exc:
            raise SealError("sealed value does not open") from exc


def new_key_spec(kid: str = "k1") -> str:
    return f"{kid}:{_b64(os.urandom(32))}"
