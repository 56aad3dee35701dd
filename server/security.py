"""Checking phone signatures and refusing replays (the scheme is in ``protocol/signing.py``)."""

from __future__ import annotations

import base64
import binascii
import time

from fedfleet.protocol.signing import public_key_ok, signature_ok, signed_text


class SignatureError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def parse_public_key(text: object) -> bytes:
    """A base64 raw 32-byte Ed25519 public key, checked to be a valid point."""
    try:
        raw = base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32 or not public_key_ok(raw):
        raise SignatureError("bad_public_key", "public_key must be a base64 raw 32-byte Ed25519 key")
    return raw


SWEEP_MIN = 4096  # the nonce book is swept of stale nonces from this size on


class NonceBook:
    """The last nonce each phone used. In memory: after a restart the skew window still
    bounds how old a replayed request can be, and merged updates stay idempotent."""

    def __init__(self, max_skew_s: float = 300.0) -> None:
        self.max_skew_s = max_skew_s
        self.last: dict[str, int] = {}
        self._sweep_at = SWEEP_MIN  # the book's size that triggers the next sweep (see _sweep)

    def precheck(self, phone: str, signature: str | None, nonce: str | None) -> None:
        """What the headers alone can refuse (missing, malformed, stale or replayed), before the
        body is read; ``verify`` then checks the signature over the body."""
        self._nonce(phone, signature, nonce)

    def _nonce(self, phone: str, signature: str | None, nonce: str | None) -> tuple[int, bytes]:
        if not signature or not nonce:
            raise SignatureError("unsigned", "this phone enrolled a key: uploads must be signed")
        try:
            n = int(nonce)
            sig = base64.b64decode(signature, validate=True)
        except (ValueError, binascii.Error):
            raise SignatureError("bad_signature", "the nonce must be an integer and the signature base64") from None
        if abs(n / 1e3 - time.time()) > self.max_skew_s:
            raise SignatureError("stale_signature", f"the nonce is more than {self.max_skew_s:.0f} s off the server clock")
        if n <= self.last.get(phone, -1):
            raise SignatureError("replay", "this nonce was used before: a replayed request")
        return n, sig

    def verify(self, public_key: bytes, phone: str, base_version: int, update_id: str, body: bytes,
               signature: str | None, nonce: str | None) -> None:
        n, sig = self._nonce(phone, signature, nonce)
        if not signature_ok(public_key, sig, signed_text(phone, base_version, update_id, body, n)):
            raise SignatureError("bad_signature", "the signature does not match this phone's key and request")
        self.last[phone] = n
        if len(self.last) >= self._sweep_at:
            self._sweep()

    def _sweep(self) -> None:
        """Forget nonces older than the skew window: a request carrying one is refused as stale
        anyway, so the book holds the phones that uploaded lately, not every phone (amortised
        O(1) an upload: swept again once it has doubled)."""
        oldest = (time.time() - self.max_skew_s) * 1e3
        for phone in [p for p, n in self.last.items() if n < oldest]:
            del self.last[phone]
        self._sweep_at = max(2 * len(self.last), SWEEP_MIN)
