"""Staleness weights for asynchronous merging (pure functions).

An update computed on version v and merged when the server is at version c has staleness
s = c - v. FedBuff (Nguyen et al. 2022) down-weights it by ``(1 + s) ** -0.5``; Xie et al.
2019 (FedAsync) list the constant, polynomial and hinge families used here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

StalenessFn = Callable[[int], float]


@dataclass(frozen=True)
class Staleness:
    """A parsed staleness rule: ``constant``, ``inverse`` (1/(1+s)), ``poly:A`` ((1+s)^-A),
    ``hinge:A:B`` (1 while s <= B, then 1/(A(s-B)+1))."""

    kind: str
    a: float = 0.5
    b: float = 0.0

    def __call__(self, s: int) -> float:
        if s < 0:
            raise ValueError("staleness cannot be negative")
        if self.kind == "constant":
            return 1.0
        if self.kind == "inverse":
            return 1.0 / (1.0 + s)
        if self.kind == "poly":
            return float((1.0 + s) ** -self.a)
        if self.kind == "hinge":
            return 1.0 if s <= self.b else 1.0 / (self.a * (s - self.b) + 1.0)
        raise ValueError(f"unknown staleness rule {self.kind!r}")


def parse_staleness(text: str) -> Staleness:
    kind, *args = text.split(":")
    try:
        nums = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"staleness {text!r}: parameters must be numbers") from None
    if kind in ("constant", "inverse") and not nums:
        return Staleness(kind)
    if kind == "poly" and len(nums) <= 1:
        a = nums[0] if nums else 0.5
        if a < 0:
            raise ValueError("poly exponent must be >= 0")
        return Staleness("poly", a=a)
    if kind == "hinge" and len(nums) == 2 and nums[0] > 0 and nums[1] >= 0:
        return Staleness("hinge", a=nums[0], b=nums[1])
    raise ValueError(f"unknown staleness rule {text!r}; use constant, inverse, poly:A or hinge:A:B")
