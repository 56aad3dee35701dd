"""Gossip mode's relay: mailboxes between neighbouring phones (docs/gossip.md).

Phones behind NAT cannot reach one another, so each message goes through the server:
``POST /v1/gossip/send?round=R&to=PHONE`` leaves one for a neighbour, ``POST /v1/gossip/post?round=R``
one for every neighbour of the round (uploaded once, fanned out by the relay),
``GET /v1/gossip/recv?round=R&from=PHONE`` takes it (once: it is deleted as it is handed over; 204
when there is none). The relay authenticates the sender (its bearer token and an Ed25519 signature
over the body, as for ``/v1/update``; signed text ``signed_text(sender, R, "gossip:" + recipient,
body, nonce)``, the recipient ``*`` for a posted message), forwards only along the edges of
the topology's round R, refuses replayed nonces, duplicates, other rounds and oversize or
malformed bodies with named 4xx errors, and never looks inside a message beyond checking that
it is a well-formed wire message of the task's tensors: it never averages.

Rounds: the relay holds the mailboxes of one round. The first message of round R + 1 opens it
and drops what round R left undelivered (the recipient was away); messages for rounds already
closed, or more than one ahead, are refused (409 ``wrong_round``). The counters of each round
(messages, bytes, deliveries) of the last TRAFFIC_ROUNDS rounds are kept for ``GET /v1/gossip/status``.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from fedfleet.protocol import decode_message
from fedfleet.protocol.signing import NONCE_HEADER, SIGNATURE_HEADER
from fedfleet.protocol.topology import EVERY_NEIGHBOUR, TO_HEADER, Topology
from fedfleet.server.http import authenticate, check_body_headers, fail, json_response, read_body
from fedfleet.server.security import NonceBook, SignatureError
from fedfleet.server.state import CONFIG, COORD, STORE

TRAFFIC_ROUNDS = 10_000  # rounds whose traffic counters /v1/gossip/status keeps (a few dozen bytes each)


@dataclass
class RoundTraffic:
    """What went through the relay in one round."""

    messages: int = 0  # accepted sends
    delivered: int = 0
    undelivered: int = 0  # left in a mailbox when the next round opened
    bytes_up: int = 0  # bodies received from senders
    bytes_down: int = 0  # bodies handed to recipients, and the answers to senders


@dataclass
class Relay:
    topology: Topology
    nonces: NonceBook
    round: int = 0  # the round whose mailboxes are open (0: none yet)
    # (from, to) -> body, signature, nonce, and whom the signature names (the recipient or EVERY_NEIGHBOUR)
    boxes: dict[tuple[str, str], tuple[bytes, str, str, str]] = field(default_factory=dict)
    sent: set[tuple[str, str]] = field(default_factory=set)  # (from, to) of the open round, delivered or not
    traffic: dict[int, RoundTraffic] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = self.topology.index()

    def check_edge(self, sender: str, recipient: str, round_: int) -> None:
        if sender not in self.index:
            fail(403, "not_in_topology", f"phone {sender!r} is not a node of the topology")
        if recipient not in self.index:
            fail(404, "unknown_phone", f"no phone {recipient[:64]!r} in the topology")
        i, j = self.index[sender], self.index[recipient]
        if (min(i, j), max(i, j)) not in self.topology.edges(round_):
            fail(403, "not_a_neighbour", f"{recipient!r} is not a neighbour of {sender!r} in round {round_}")

    def neighbours(self, sender: str, round_: int) -> list[str]:
        """The sender's neighbours in ``round_`` (none: a phone left out of a round's matching)."""
        if sender not in self.index:
            fail(403, "not_in_topology", f"phone {sender!r} is not a node of the topology")
        return [self.topology.names[j] for j in self.topology.neighbours(round_)[self.index[sender]]]

    def check_round(self, round_: int, sending: bool) -> None:
        ok = self.round <= round_ <= self.round + 1 if sending else round_ == self.round
        if not ok:
            fail(409, "wrong_round", f"round {round_} is not open: the relay is in round {self.round}"
                                     + (" (a send may open the next)" if sending else ""))

    def open(self, round_: int) -> None:
        """Open ``round_`` (the current one or the next): a new round drops the old one's leftovers."""
        if round_ == self.round:
            return
        self.traffic.setdefault(self.round, RoundTraffic()).undelivered += len(self.boxes)
        self.boxes.clear()
        self.sent.clear()
        self.round = round_
        self.traffic.pop(round_ - TRAFFIC_ROUNDS, None)  # rounds open one after another: one falls out

    def of(self, round_: int) -> RoundTraffic:
        return self.traffic.setdefault(round_, RoundTraffic())


RELAY = web.AppKey("relay", Relay)


def _round(request: web.Request) -> int:
    text = request.query.get("round", "")
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 1 << 62:
        fail(400, "bad_query", "round must be a positive integer")
    return int(text)


def _peer(request: web.Request, key: str) -> str:
    name = request.query.get(key)
    if not name:
        fail(400, "bad_query", f"{key} must name a phone")
    return name


async def send(request: web.Request) -> web.Response:
    """One message to one neighbour (``to``), signed for that recipient."""
    return await _accept(request, _peer(request, "to"))


async def post(request: web.Request) -> web.Response:
    """One message to every neighbour of the round: uploaded once, signed for ``gossip:*``, handed
    to each neighbour that fetches it (the relay fans it out, as a phone's uplink is its scarce link)."""
    return await _accept(request, None)


async def _accept(request: web.Request, recipient: str | None) -> web.Response:
    """Check and store a message for ``recipient`` (None: every neighbour of the sender this round)."""
    app = request.app
    relay, cfg = app[RELAY], app[CONFIG]
    sender = authenticate(request, app[STORE])
    round_ = _round(request)
    check_body_headers(request, cfg.max_update_bytes)
    key = app[STORE].public_key(sender)
    signature, nonce = request.headers.get(SIGNATURE_HEADER), request.headers.get(NONCE_HEADER)
    try:
        if key is None:
            raise SignatureError("unsigned", "gossip messages must be signed: enrol a public_key at registration")
        relay.nonces.precheck(sender, signature, nonce)
    except SignatureError as exc:
        fail(401, exc.reason, exc.message)
    recipients = [recipient] if recipient is not None else relay.neighbours(sender, round_)
    for to in recipients:
        relay.check_edge(sender, to, round_)
    relay.check_round(round_, sending=True)
    body = await read_body(request, cfg.max_update_bytes, cfg.request_timeout_s)
    msg = decode_message(body, expected=app[COORD].specs, max_bytes=cfg.max_update_bytes)  # ProtocolError -> 400
    if msg.kind != "update" or msg.meta.get("round") != round_ or msg.meta.get("from") != sender:
        fail(400, "bad_meta", "a gossip message is an 'update' message whose meta names its round and sender "
                              "('round', 'from') as the request does")
    target = recipient if recipient is not None else EVERY_NEIGHBOUR
    try:
        relay.nonces.verify(key, sender, round_, f"gossip:{target}", body, signature, nonce)
    except SignatureError as exc:
        fail(401, exc.reason, exc.message)
    relay.check_round(round_, sending=True)  # the body was awaited: another send may have moved on
    taken = [to for to in recipients if round_ == relay.round and (sender, to) in relay.sent]
    if taken:
        fail(409, "duplicate", f"{sender!r} already sent {taken[0]!r} a message in round {round_}")
    relay.open(round_)
    for to in recipients:  # one body, shared by every mailbox it is left in
        relay.boxes[(sender, to)] = (body, signature or "", nonce or "", target)
        relay.sent.add((sender, to))
    traffic = relay.of(round_)
    traffic.messages += len(recipients)
    traffic.bytes_up += len(body)
    answer: dict[str, Any] = {"queued": True, "round": round_}
    if recipient is None:
        answer["recipients"] = len(recipients)
    response = json_response(answer, status=202)
    traffic.bytes_down += response.content_length or 0  # the answer's bytes, as for updates
    return response


async def receive(request: web.Request) -> web.Response:
    """The message ``from`` left for this phone in ``round``, with its sender's signature headers
    (a recipient holding the sender's key can check it end to end); 204 No Content if none (the
    sender was away: an answer, not the phone's error, so not charged to its failure budget)."""
    app = request.app
    relay = app[RELAY]
    recipient = authenticate(request, app[STORE])
    round_, sender = _round(request), _peer(request, "from")
    relay.check_round(round_, sending=False)
    held = relay.boxes.pop((sender, recipient), None)
    if held is None:
        return web.Response(status=204)
    body, signature, nonce, target = held
    traffic = relay.of(round_)
    traffic.delivered += 1
    traffic.bytes_down += len(body)
    return web.Response(body=body, content_type="application/octet-stream",
                        headers={SIGNATURE_HEADER: signature, NONCE_HEADER: nonce, "X-Fedfleet-From": sender,
                                 TO_HEADER: target})


async def topology(request: web.Request) -> web.Response:
    """Round R's graph, as phones learn it: the phone names (node i is ``phones[i]``), the edges, and
    each phone's enrolled public key (base64; null before it enrols), with which a recipient checks
    every relayed message's signature itself: the relay cannot alter or forge one unnoticed."""
    store = request.app[STORE]
    authenticate(request, store)
    relay = request.app[RELAY]
    r = _round(request)
    keys = [store.public_key(name) for name in relay.topology.names]
    return json_response({"round": r, "topology": relay.topology.spec, "phones": list(relay.topology.names),
                          "edges": [list(e) for e in sorted(relay.topology.edges(r))],
                          "keys": [base64.b64encode(k).decode() if k else None for k in keys]})


async def status(request: web.Request) -> web.Response:
    """The relay's open round and each round's traffic (``?round=R``: that round's only)."""
    relay = request.app[RELAY]
    rounds: dict[int, RoundTraffic] = relay.traffic
    if "round" in request.query:
        r = _round(request)
        rounds = {r: relay.traffic.get(r, RoundTraffic())}
    body: dict[str, Any] = {"round": relay.round, "topology": relay.topology.spec,
                            "phones": len(relay.topology.names),
                            "rounds": {str(r): asdict(t) for r, t in sorted(rounds.items()) if r > 0}}
    return json_response(body)


def setup_relay(app: web.Application) -> None:
    """Gossip mode (``topology`` set in the server's config): the relay's routes and state."""
    cfg = app[CONFIG]
    app[RELAY] = Relay(cfg.gossip_topology(), NonceBook(cfg.signature_skew_s))
    app.router.add_routes([
        web.post("/v1/gossip/send", send),
        web.post("/v1/gossip/post", post),
        web.get("/v1/gossip/recv", receive),
        web.get("/v1/gossip/status", status),
        web.get("/v1/gossip/topology", topology),
    ])
