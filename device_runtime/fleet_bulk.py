"""A fleet's whole population registered before its first check-in, in bulk (POST /v1/admin/phones).

A phone's key is a 32-byte seed derived from the fleet's secret and its index (fleet_columns.key_seed);
its public half (~25 us of CPU a key with PyNaCl, measured over 20,000 keys) is derived on a worker
thread, a chunk ahead, while the server checks and stores the chunk before. A worker process would
need the program's main module to be importable again (multiprocessing's spawn). The tokens the server gives come back as one column
of fixed-width bytes (``TOKEN_BYTES`` a phone), not a Python object per phone.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
from collections.abc import Sequence
from typing import Any

import aiohttp
import numpy as np
from nacl.bindings import crypto_sign_seed_keypair

from fedfleet.device_runtime.fleet_columns import key_seed
from fedfleet.device_runtime.protocol_client import ServerError, _json_object, _server_error

BULK_CHUNK = 10_000  # phones per request: the server's limit (server/bulk_registration.BULK_MAX_PHONES)
TOKEN_BYTES = 32  # secrets.token_urlsafe(24): 32 ASCII characters


def public_keys(secret: bytes, indices: Sequence[int]) -> list[str]:
    """The base64 Ed25519 public keys of phones ``indices`` (as ``PhoneKey(key_seed(secret, i)).public_b64()``)."""
    return [base64.b64encode(crypto_sign_seed_keypair(key_seed(secret, i))[0]).decode() for i in indices]


async def register_in_bulk(session: aiohttp.ClientSession, server: str, admin_token: str, names: Sequence[str],
                           keys: Sequence[str] | None = None, *, secret: bytes | None = None,
                           indices: Sequence[int] | None = None, platform: str = "emulated",
                           model_fingerprint: str | None = None,
                           chunk: int = BULK_CHUNK) -> tuple[np.ndarray, dict[str, Any]]:
    """Register ``names`` (with ``keys``, or the keys of phones ``indices`` under ``secret``,
    derived on a worker thread) in requests of ``chunk``; returns their tokens (``S32``, in the
    order of ``names``) and the task the server answered with. A refused request raises its ServerError
(the requests before it stay registered: each is one transaction)."""
    tokens = np.zeros(len(names), dtype=f"S{TOKEN_BYTES}")
    task: dict[str, Any] = {}
    starts = range(0, len(names), chunk)
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    if keys is None:
        if secret is None or indices is None:
            raise ValueError("register_in_bulk needs the keys, or the fleet's secret and the phones' indices")
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fedfleet-keys")
    loop = asyncio.get_running_loop()

    def keys_of(a: int) -> asyncio.Future[list[str]]:
        if pool is None:
            assert keys is not None
            fut: asyncio.Future[list[str]] = loop.create_future()
            fut.set_result(list(keys[a:a + chunk]))
            return fut
        assert secret is not None and indices is not None
        return asyncio.wrap_future(pool.submit(public_keys, secret, list(indices[a:a + chunk])))

    try:
        upcoming = keys_of(0) if len(names) else None
        for a in starts:
            assert upcoming is not None
            chunk_keys = await upcoming
            upcoming = keys_of(a + chunk) if a + chunk < len(names) else None  # derived while this one registers
            body: dict[str, Any] = {"phones": [{"name": n, "public_key": k, "platform": platform}
                                               for n, k in zip(names[a:a + chunk], chunk_keys, strict=True)]}
            if model_fingerprint is not None:
                body["model_fingerprint"] = model_fingerprint
            async with session.post(server.rstrip("/") + "/v1/admin/phones", json=body,
                                    headers={"Authorization": f"Bearer {admin_token}"}) as resp:
                payload = await resp.read()
                if resp.status >= 400:
                    raise _server_error(resp.status, payload)
            answer = _json_object(payload)
            got = answer["tokens"]
            if answer["phone_ids"] != list(names[a:a + chunk]) or any(len(t) != TOKEN_BYTES for t in got):
                raise ServerError(502, "bad_answer", "the bulk registration's answer does not match its request")
            tokens[a:a + len(got)] = got
            task = answer["task"]
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    return tokens, task
