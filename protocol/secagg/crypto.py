"""The primitives of secure aggregation, each named in FORMAT.md so other languages match
the bytes:

- key agreement: X25519 (RFC 7748), libsodium's ``crypto_scalarmult`` through PyNaCl;
- key derivation: HKDF-SHA256 (RFC 5869) with an empty salt and a labelled ``info``;
- share encryption: ChaCha20-Poly1305 (RFC 8439, IETF, 12-byte nonce), libsodium's AEAD
  through PyNaCl, keyed by HKDF of the X25519 secret of the two phones' channel keys;
- mask expansion (the PRG): the ChaCha20 keystream (RFC 8439) of a 32-byte key with a zero
  nonce and block counter 0, read as little-endian uint64 words, reduced mod 2**b.

Everything a phone keeps secret derives from 32 bytes of entropy, so a fixed entropy
reproduces every message (golden vectors); real phones draw it from the OS.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl import bindings
from nacl.exceptions import CryptoError

from fedfleet.protocol.secagg.errors import BadShare

KEY_BYTES = 32
LABEL = b"fedfleet-secagg-v1 "


def hkdf(secret: bytes, label: str, context: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256(ikm=secret, salt=empty, info="fedfleet-secagg-v1 " + label + 0x00 + context)."""
    info = LABEL + label.encode() + b"\x00" + context
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def public_key(secret_key: bytes) -> bytes:
    return bindings.crypto_scalarmult_base(secret_key)


def agree(secret_key: bytes, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret. libsodium refuses an all-zero result (a low-order
    peer key); that is the peer's fault, so it surfaces as ``BadShare``."""
    try:
        return bindings.crypto_scalarmult(secret_key, peer_public)
    except (CryptoError, RuntimeError, TypeError, ValueError) as e:
        raise BadShare(f"unusable public key: {e}") from e


def prg_words(key: bytes, count: int) -> np.ndarray:
    """``count`` little-endian uint64 words of the ChaCha20 keystream of ``key``
    (nonce 0, counter 0): word i is keystream bytes [8i, 8i + 8)."""
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * count))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def mask(key: bytes, count: int, modulus_bits: int) -> np.ndarray:
    """The PRG's first ``count`` words mod 2**modulus_bits, uint64 (count,)."""
    words = prg_words(key, count)
    if modulus_bits < 64:
        words &= np.uint64((1 << modulus_bits) - 1)
    return words


def _channel_key(own_secret: bytes, peer_public: bytes, context: bytes, sender: int, recipient: int) -> bytes:
    ident = context + b"\x00" + sender.to_bytes(4, "big") + recipient.to_bytes(4, "big")
    return hkdf(agree(own_secret, peer_public), "share channel", ident)


def _aad(context: bytes, sender: int, recipient: int) -> bytes:
    return context + b"\x00" + sender.to_bytes(4, "big") + recipient.to_bytes(4, "big")


NONCE = bytes(12)  # each channel key encrypts exactly one message


def seal(own_secret: bytes, peer_public: bytes, context: bytes, sender: int, recipient: int, plain: bytes) -> bytes:
    key = _channel_key(own_secret, peer_public, context, sender, recipient)
    aad = _aad(context, sender, recipient)
    return bindings.crypto_aead_chacha20poly1305_ietf_encrypt(plain, aad, NONCE, key)


def open_sealed(
    own_secret: bytes, peer_public: bytes, context: bytes, sender: int, recipient: int, sealed: bytes
) -> bytes:
    key = _channel_key(own_secret, peer_public, context, sender, recipient)
    try:
        return bindings.crypto_aead_chacha20poly1305_ietf_decrypt(sealed, _aad(context, sender, recipient), NONCE, key)
    except CryptoError as e:
        raise BadShare(f"the share from phone {sender} to phone {recipient} does not decrypt") from e
