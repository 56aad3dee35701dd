"""Signed uploads (both sides of the wire; FORMAT.md, "Signed uploads").

A phone that enrols with an Ed25519 public key (RFC 8032) signs every upload over

    "fedfleet-v1\\n{phone}\\n{base_version}\\n{update_id}\\n{sha256(body) hex}\\n{nonce}"

sent in ``X-Fedfleet-Signature`` (base64) and ``X-Fedfleet-Nonce`` (the phone's clock in
milliseconds, strictly increasing per phone), so a captured request cannot be replayed.

Ed25519 is libsodium's (PyNaCl): on this machine it verifies in ~90 us and signs in ~26 us,
against ~250 / ~87 us for OpenSSL's through ``cryptography`` (signature checks were a quarter
of the server's time per upload). Signatures are plain RFC 8032 either way; libsodium is the
stricter verifier (it refuses small-order keys and non-canonical signatures).
"""

from __future__ import annotations

import base64
import hashlib
import time

from nacl.bindings import crypto_sign_ed25519_pk_to_curve25519
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

SIGNATURE_HEADER = "X-Fedfleet-Signature"
NONCE_HEADER = "X-Fedfleet-Nonce"


def signed_text(phone: str, base_version: int, update_id: str, body: bytes, nonce: int) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"fedfleet-v1\n{phone}\n{base_version}\n{update_id}\n{digest}\n{nonce}".encode()


def public_key_ok(raw: bytes) -> bool:
    """32 bytes that are a point of the curve (small-order points are refused at verification)."""
    if len(raw) != 32:
        return False
    try:
        crypto_sign_ed25519_pk_to_curve25519(raw)  # decodes the point: fails if it is not on the curve
    except (ValueError, TypeError, RuntimeError):
        return False
    return True


def signature_ok(public_key: bytes, signature: bytes, text: bytes) -> bool:
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        VerifyKey(public_key).verify(text, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


class PhoneKey:
    """The phone's key pair and the headers for one signed upload."""

    def __init__(self, seed: bytes | None = None) -> None:
        # None: a key from the OS (keys are secrets, not part of a seeded run). ``seed``: the key's
        # 32-byte RFC 8032 seed, the key made from it each time it is used (an emulated fleet derives
        # its idle phones' keys from a secret of its own rather than holding a million key objects).
        self._key: SigningKey | bytes = SigningKey.generate() if seed is None else seed
        self._last = 0

    @property
    def _signing(self) -> SigningKey:
        key = self._key
        return key if isinstance(key, SigningKey) else SigningKey(key)

    def public_b64(self) -> str:
        return base64.b64encode(bytes(self._signing.verify_key)).decode()

    def headers(self, phone: str, base_version: int, update_id: str, body: bytes) -> dict[str, str]:
        nonce = max(int(time.time() * 1e3), self._last + 1)
        self._last = nonce
        sig = self._signing.sign(signed_text(phone, base_version, update_id, body, nonce)).signature
        return {SIGNATURE_HEADER: base64.b64encode(sig).decode(), NONCE_HEADER: str(nonce)}
