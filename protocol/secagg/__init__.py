"""Secure aggregation (SecAgg+, Bell et al., 2020) with distributed DP: phones mask their
integer updates so that the server learns only their sum. Specified in FORMAT.md
("Secure aggregation"); the design and threat model are in docs/secure-aggregation.md.

Pure: no clock, no I/O. ``phone.SecAggPhone`` is one phone's four steps;
``unmask.unmask_sum`` is the server's last one; ``params.group_params`` derives and checks
what a group agrees on; ``integer`` is the codec of secure rounds; ``dp`` its accounting.
"""

from fedfleet.protocol.secagg.errors import (
    BadShare,
    BelowThreshold,
    DuplicateShare,
    NotANeighbour,
    SecAggError,
    ShareRequestRefused,
    SumMayWrap,
    WrongStep,
)
from fedfleet.protocol.secagg.params import GroupParams, group_params
from fedfleet.protocol.secagg.phone import PublicKeys, SecAggPhone, UnmaskShares
from fedfleet.protocol.secagg.unmask import unmask_sum

__all__ = [
    "BadShare",
    "BelowThreshold",
    "DuplicateShare",
    "GroupParams",
    "NotANeighbour",
    "PublicKeys",
    "SecAggError",
    "SecAggPhone",
    "ShareRequestRefused",
    "SumMayWrap",
    "UnmaskShares",
    "WrongStep",
    "group_params",
    "unmask_sum",
]
