"""Named errors of secure aggregation. Each maps to one 4xx reason on the server; the
group that raised one is left as it was."""

from fedfleet.protocol.errors import ProtocolError


class SecAggError(ProtocolError):
    reason = "secagg"


class SumMayWrap(SecAggError):
    """The modulus 2**b is too small for the group's largest possible sum."""

    reason = "sum_may_wrap"


class BadShare(SecAggError):
    """A share that does not decrypt, does not parse, or does not lie on the sender's polynomial."""

    reason = "bad_share"


class DuplicateShare(SecAggError):
    reason = "duplicate_share"


class NotANeighbour(SecAggError):
    """A share addressed to, or about, a phone outside the sender's neighbours."""

    reason = "not_a_neighbour"


class WrongStep(SecAggError):
    """A message for another step, group or round, or a second copy of one already taken."""

    reason = "wrong_step"


class BelowThreshold(SecAggError):
    """Too few phones (or shares) remain to unmask: the group aborts and reveals nothing."""

    reason = "below_threshold"


class ShareRequestRefused(SecAggError):
    """An unmask request that would reveal one survivor's update alone: both its self-mask
    seed share and its pairwise key share, or a phone counted as survivor and dropped."""

    reason = "share_request_refused"
