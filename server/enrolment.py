"""Enrolment codes: registration that needs an admin-issued, single-use code.

The admin writes the codes to a file, one per line (``#`` comments and blank lines are skipped),
and starts the server with ``--enrolment-codes FILE`` (``enrolment_codes``); each phone is given one
and sends it as ``enrolment_code`` in its registration. A code registers one phone: the phone's
row in the store records the code's SHA-256 (committed with the registration itself), so a code
stays spent across restarts, and codes added to the file later become valid at the next start.
A registration without a code, with an unknown one or a spent one, is refused with 403 and a named
error before anything is written.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from aiohttp import web

from fedfleet.server.store import Store

CODE_RE = re.compile(r"^[A-Za-z0-9_.~+/=-]{8,128}$")


class EnrolmentRefused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def read_codes(path: str | Path) -> list[str]:
    """The codes in ``path``; a ValueError naming the file and line for a malformed one, or an
    empty file (FileNotFoundError if it is missing)."""
    path = Path(path)
    codes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        code = line.strip()
        if not code or code.startswith("#"):
            continue
        if not CODE_RE.match(code):
            raise ValueError(f"enrolment codes {path}, line {number}: a code is 8-128 characters of letters, "
                             "digits and -_.~+/=")
        codes.append(code)
    if not codes:
        raise ValueError(f"enrolment codes {path}: no codes in it")
    return codes


class EnrolmentCodes:
    """The valid codes (as hashes) and those spent, the latter read back from the store at start."""

    def __init__(self, codes: list[str], spent: set[str]) -> None:
        self.valid = {code_hash(c) for c in codes}
        self.spent = set(spent) & self.valid  # a code taken out of the file stays invalid
        self.claimed: set[str] = set()  # claimed by a registration whose commit is in flight

    def claim(self, code: object) -> str:
        """Claim ``code`` for one registration and return its hash, or raise ``EnrolmentRefused``.
        Runs on the event loop without awaiting, so two registrations cannot claim one code."""
        if code is None:
            raise EnrolmentRefused("enrolment_code_required", "this server registers only phones with an "
                                                              "enrolment code from its admin (enrolment_code)")
        digest = code_hash(code) if isinstance(code, str) and len(code) <= 128 else ""
        if digest not in self.valid:
            raise EnrolmentRefused("bad_enrolment_code", "this enrolment code was not issued by this server")
        if digest in self.spent or digest in self.claimed:
            raise EnrolmentRefused("enrolment_code_used", "this enrolment code has already registered a phone")
        self.claimed.add(digest)
        return digest

    def settle(self, digest: str, registered: bool) -> None:
        """The registration that claimed ``digest`` is committed (the code is spent) or failed (free again)."""
        self.claimed.discard(digest)
        if registered:
            self.spent.add(digest)

    def remaining(self) -> int:
        return len(self.valid - self.spent - self.claimed)


ENROLMENT = web.AppKey("enrolment_codes", EnrolmentCodes)


def setup_enrolment(app: web.Application, codes: list[str] | None, store: Store) -> None:
    """Require one of ``codes`` (``read_codes``) at registration (nothing when it is None)."""
    if codes is not None:
        app[ENROLMENT] = EnrolmentCodes(codes, store.enrolment_codes_spent())
