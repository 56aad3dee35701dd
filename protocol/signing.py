"""Signed uploads (both sides of the wire; FORMAT.md, "Signed uploads").

A phone that enrols with an Ed25519 public key (RFC 8032) signs every upload over

    "fedfleet-v1\\n{phone}\\n{base_version}\\n{update_id}\\n{sha256(body) hex}\\n{nonce}"

sent in ``X-Fedfleet-Signature`` (base64) and ``X-Fedfleet-Nonce`` (the phone's clock in
milliseconds, strictly increasing per phone), so a captured request cannot be replayed.
"""

from __future__ import annotations

import base64
import hashlib
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SIGNATURE_HEADER = "X-Fedfleet-Signature"
NONCE_HEADER = "X-Fedfleet-Nonce"


def signed_text(phone: str, base_version: int, update_id: str, body: bytes, nonce: int) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"fedfleet-v1\n{phone}\n{base_version}\n{update_id}\n{digest}\n{nonce}".encode()


def public_key_ok(raw: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return False
    return True


def signature_ok(public_key: bytes, signature: bytes, text: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, text)
    except (InvalidSignature, ValueError):
        return False
    return True


class PhoneKey:
    """The phone's key pair and the headers for one signed upload."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()  # from the OS: keys are secrets, not part of a seeded run
        self._last = 0

    def public_b64(self) -> str:
        return base64.b64encode(self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()

    def headers(self, phone: str, base_version: int, update_id: str, body: bytes) -> dict[str, str]:
        nonce = max(int(time.time() * 1e3), self._last + 1)
        self._last = nonce
        sig = self._key.sign(signed_text(phone, base_version, update_id, body, nonce))
        return {SIGNATURE_HEADER: base64.b64encode(sig).decode(), NONCE_HEADER: str(nonce)}
