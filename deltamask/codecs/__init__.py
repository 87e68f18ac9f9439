"""Update codecs behind one interface (`Codec`): filters, the exact position list, whole masks, and the
baselines' Bloom filter and dense weight updates.

    codec = get_codec("bfuse8")
    payload = codec.encode(kept_positions, d, thresholds)   # bytes, self-describing (see `base`); thresholds:
    update = decode(payload, d, thresholds)                 # the round's theta, for the "-cond" codecs
    client_mask = update.client_mask(reference_mask)
"""
from typing import Dict

from deltamask.codecs.base import FLIPS, MASK, WEIGHTS, Codec, DecodedUpdate, FlipUpdate, read_frame
from deltamask.codecs.bloom import Bloom
from deltamask.codecs.conditional import Conditional
from deltamask.codecs.dense import Eden, Float32, WeightUpdate
from deltamask.codecs.exact import Exact
from deltamask.codecs.filters import BFuse8, BFuse16, Xor8, Xor16
from deltamask.codecs.rawmask import BitMask, RawMask
from deltamask.errors import PayloadError

# the baselines beside DeltaMask's codecs: rawmask (FedPM), bitmask (FedMask), bloom (DeepReduce), float32
# (fine-tuning with FedAvg) and eden (EDEN's 1-bit quantiser), each framed the same way
_PLAIN = (BFuse8(), BFuse16(), Xor8(), Xor16(), Exact(), RawMask(), Bloom(), BitMask(), Float32(), Eden())
# conditional forms (codec ids 11-15): positions ranked within theta_g's undecided set (codecs/conditional.py)
_CONDITIONAL = tuple(Conditional(inner, 10 + inner.codec_id) for inner in _PLAIN if inner.carries == FLIPS)
CODECS: Dict[str, Codec] = {c.name: c for c in _PLAIN + _CONDITIONAL}
_BY_ID = {c.codec_id: c for c in CODECS.values()}


def get_codec(name: str) -> Codec:
    """The codec registered under `name`; ValueError naming the known ones otherwise."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(CODECS)}") from None


def decode(payload: bytes, d: int, thresholds=None) -> DecodedUpdate:
    """Decode a payload of any codec; PayloadError for an unknown codec id or a bad payload. `thresholds`,
    the round's global theta, is needed by the conditional codecs (and ignored by the others)."""
    frame = read_frame(payload)
    if frame.codec_id not in _BY_ID:
        raise PayloadError(f"unknown codec id {frame.codec_id}; known ids: {sorted(_BY_ID)}")
    return _BY_ID[frame.codec_id].decode_frame(frame, d, thresholds)


__all__ = ["CODECS", "FLIPS", "MASK", "WEIGHTS", "Codec", "DecodedUpdate", "FlipUpdate", "WeightUpdate", "decode",
           "get_codec"]
