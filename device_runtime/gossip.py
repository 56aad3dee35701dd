"""A phone's side of gossip mode (docs/gossip.md): its own model, what it sends its neighbours
through the server's relay, and how it folds in what they sent. The arithmetic is in
``gossip_math``; enrolment, signing keys and HTTP (with byte counts) are the ProtocolClient's.

D-PSGD and ADMM send the whole model, dense float32; D-PSGD may send it quantized by the task's
codec (its value steps only: quantization and zlib, never sparsification, which would send a
model with most of its weights zeroed). CHOCO-SGD sends q = Q(x - x_hat) encoded by
the task's update codec (top-k, random-k, quantization: the same encoder and wire format as FedAvg
updates; without error feedback, which CHOCO's x_hat already provides) and keeps x_hat, its
public copy, in step with what its neighbours decode, by decoding its own message. Every message
received is checked against its sender's own signature before it is used.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedfleet.device_runtime.gossip_frame import compact
from fedfleet.device_runtime.gossip_math import MODEL_CODEC, add, admm_center, admm_dual, choco_mix, mix
from fedfleet.device_runtime.protocol_client import ProtocolClient, ServerError
from fedfleet.protocol import TensorMessage, UpdateEncoder, decode_message, encode_message
from fedfleet.protocol.signing import NONCE_HEADER, SIGNATURE_HEADER, signature_ok, signed_text
from fedfleet.protocol.topology import EVERY_NEIGHBOUR, TO_HEADER

Params = dict[str, np.ndarray]
ALGORITHMS = ("dpsgd", "choco", "admm")


def check_codec(algorithm: str, codec: Mapping[str, Any]) -> None:
    """Refuse a codec the algorithm cannot use (ValueError, one line naming it): ADMM sends whole
    float32 models; D-PSGD whole models, quantized or zlib-compressed at most."""
    if algorithm == "admm" and codec:
        raise ValueError(f"gossip admm sends whole float32 models: the codec ({dict(codec)}) is for choco, "
                         "or for dpsgd's quantization")
    extra = sorted(set(codec) - set(MODEL_CODEC))
    if algorithm == "dpsgd" and extra:
        raise ValueError(f"gossip dpsgd sends whole models: of the codec it takes quantization and zlib only, "
                         f"not {extra} (sparsified gossip is choco)")


class GossipPhone:
    def __init__(self, client: ProtocolClient, algorithm: str, params: Mapping[str, np.ndarray], *,
                 encoder: UpdateEncoder | None = None, gamma: float = 1.0, rho: float = 0.1) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"gossip algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if algorithm == "choco" and encoder is None:
            raise ValueError("CHOCO-SGD needs an update encoder (its compression)")
        if algorithm == "admm" and encoder is not None:
            raise ValueError("ADMM sends whole float32 models: no encoder")
        if client.key is None:
            raise ValueError("gossip messages are signed: the phone needs a key")
        self.client, self.algorithm, self.encoder, self.gamma, self.rho = client, algorithm, encoder, gamma, rho
        self.x: Params = {n: np.array(p, dtype=np.float32) for n, p in params.items()}
        # CHOCO: x_hat of this phone and of each neighbour heard from (all start at 0, as in the paper)
        self.hat: Params = {n: np.zeros_like(p) for n, p in self.x.items()}
        self.hats: dict[str, Params] = {}
        self.peer_keys: dict[str, bytes] = {}  # neighbours' Ed25519 public keys, as the relay lists them
        # ADMM: the dual variable a_i and each neighbour's latest model
        self.dual: Params = {n: np.zeros(p.shape) for n, p in self.x.items()}
        self.heard: dict[str, Params] = {}
        self._start: Params = self.x

    @property
    def name(self) -> str:
        return self.client.name

    def message(self, round_: int) -> bytes:
        """This round's message to every neighbour: the model (D-PSGD: through the codec's value steps
        when it has an encoder; its own model stays as it is) or q (CHOCO, which then moves x_hat by
        the q its neighbours will decode). Its header travels zlib-compressed when shorter (gossip_frame)."""
        meta: dict[str, Any] = {"algorithm": self.algorithm, "from": self.name, "round": round_}
        if self.encoder is None:
            return compact(encode_message("update", meta, self.x))
        if self.algorithm == "dpsgd":
            return compact(self.encoder.encode({n: v.astype(np.float64) for n, v in self.x.items()}, meta))
        body = compact(self.encoder.encode({n: self.x[n].astype(np.float64) - self.hat[n] for n in self.x}, meta))
        self.hat = add(self.hat, decode_message(body).tensors)
        return body

    async def send(self, round_: int, to: str, body: bytes) -> None:
        assert self.client.key is not None
        headers = {"Content-Type": "application/octet-stream",
                   **self.client.key.headers(self.name, round_, f"gossip:{to}", body)}
        await self.client._request("POST", f"/v1/gossip/send?round={round_}&to={to}", data=body, headers=headers)

    async def post(self, round_: int, body: bytes) -> None:
        """This round's message to every neighbour at once: uploaded once, the relay fans it out."""
        assert self.client.key is not None
        headers = {"Content-Type": "application/octet-stream",
                   **self.client.key.headers(self.name, round_, f"gossip:{EVERY_NEIGHBOUR}", body)}
        await self.client._request("POST", f"/v1/gossip/post?round={round_}", data=body, headers=headers)

    async def receive(self, round_: int, sender: str) -> TensorMessage | None:
        """The message ``sender`` left this round, checked against the task's tensors; None if none
        came (the sender was away)."""
        status, payload, headers = await self.client._request("GET", f"/v1/gossip/recv?round={round_}&from={sender}")
        if status == 204:
            return None
        if not self.signed_by(sender, round_, payload, headers):
            raise ServerError(502, "bad_signature", f"the relay handed over a message {sender!r} did not sign "
                                                    f"for this phone and round {round_}")
        msg = decode_message(payload, expected=self.client.specs)
        if msg.meta.get("from") != sender or msg.meta.get("round") != round_:
            raise ServerError(502, "bad_answer", f"the relay handed over a message of {msg.meta.get('from')!r}, "
                                                 f"round {msg.meta.get('round')}, for {sender!r}, round {round_}")
        return msg

    def signed_by(self, sender: str, round_: int, body: bytes, headers: Mapping[str, str]) -> bool:
        """The sender's own Ed25519 signature (forwarded by the relay) over this body, round and recipient
        (this phone, or every neighbour of the round: the recipient's own neighbours are the only
        senders it fetches from)."""
        key = self.peer_keys.get(sender)
        target = headers.get(TO_HEADER, self.name)
        if target not in (self.name, EVERY_NEIGHBOUR):
            return False
        try:
            signature = base64.b64decode(headers.get(SIGNATURE_HEADER, ""), validate=True)
            nonce = int(headers.get(NONCE_HEADER, ""))
        except (binascii.Error, ValueError):
            return False
        return key is not None and signature_ok(key, signature, signed_text(sender, round_, f"gossip:{target}",
                                                                              body, nonce))

    def absorb(self, received: Mapping[str, TensorMessage], weights: Mapping[str, float]) -> None:
        """One gossip step with the neighbours heard from this round (``weights``: w_ij of every
        neighbour; the missing ones' weight stays with this phone)."""
        index = {name: k for k, name in enumerate(sorted(received))}
        w = {index[name]: weights[name] for name in received}
        if self.algorithm == "admm":  # no averaging: the dual moves, and the centre of the next round with it
            fresh = {index[name]: m.tensors for name, m in received.items()}
            if fresh:
                self.dual = admm_dual(self.dual, self.x, fresh, self.rho)
            self.heard.update({name: m.tensors for name, m in received.items()})
            return
        if self.algorithm == "dpsgd":
            self.x = mix(self.x, {index[name]: m.tensors for name, m in received.items()}, w)
            return
        for name, m in received.items():
            self.hats[name] = add(self.hats.get(name, {n: np.zeros_like(p) for n, p in self.x.items()}), m.tensors)
        self.x = choco_mix(self.x, self.hat, {index[name]: self.hats[name] for name in received}, w, self.gamma)

    def train_start(self) -> tuple[Params, float | None]:
        """Where this round's local training starts, and its proximal weight (None: the task's):
        the model itself, or for ADMM the centre c of its x-update with mu = 2 rho d (see admm_center;
        before it has heard from any neighbour, its own model and no proximal term)."""
        if self.algorithm != "admm" or not self.heard:
            self._start = self.x
            return self.x, None
        index = {name: k for k, name in enumerate(sorted(self.heard))}
        c = admm_center(self.x, {index[n]: m for n, m in self.heard.items()}, self.dual, self.rho)
        self._start = {n: v.astype(np.float32) for n, v in c.items()}
        return self._start, 2 * self.rho * len(self.heard)

    def train_step(self, delta: Mapping[str, np.ndarray]) -> None:
        """Apply a local training delta (params' - params), from where ``train_start`` said."""
        self.x = {n: (self._start[n] + delta[n]).astype(np.float32) for n in self.x}
