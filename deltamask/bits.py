"""Bit accounting: what an update costs on the wire, and the floor it is compared with."""
import math


def payload_bits(payload: bytes) -> int:
    """Uplink bits of an update: 8 x the bytes of the whole serialized payload."""
    return 8 * len(payload)


def bpp(bits: float, d: int) -> float:
    """Bits per masked parameter."""
    return bits / d


def bits_per_position(bits: float, positions: int) -> float:
    """Bits per kept (coded) position; nan when there is none."""
    return bits / positions if positions else float("nan")


def filter_floor_bits(positions: int, fingerprint_bits: int) -> float:
    """The least a filter with false-positive rate 2**-b can cost: b bits per key."""
    return float(positions * fingerprint_bits)


def exact_floor_bits(d: int, positions: int) -> float:
    """log2 C(d, k): the least any exact list of k positions out of d can cost."""
    if not 0 <= positions <= d:
        raise ValueError(f"{positions} positions out of d = {d}")
    return (math.lgamma(d + 1) - math.lgamma(positions + 1) - math.lgamma(d - positions + 1)) / math.log(2)
