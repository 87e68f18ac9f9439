"""Benchmark of the update codecs: payload size, encode and decode time, false flips, against the floor.

For every d x density x codec it draws exactly k = round(density * d) unique random positions (the
kept delta set), encodes them, decodes the payload and materialises every flip the server would apply
(for the filters: asks the filter about all d positions, the server's decode hot path), and checks the
result against the input. `rawmask` (the FedPM baseline) encodes a whole client mask instead: a
reference mask that is mostly ones (each position one with probability 0.99) with the k positions
flipped; it is decoded back to the whole mask.

For the filter codecs the same run also times the per-key alternatives and extrapolates them to d
lookups: pyfusefilter's public Python API (`Fuse8(...).contains(i)`, which hashes str(i) with xxh64
one key at a time) and the C `*_contain` function called through cffi, one key at a time, on the
payload's own filter (deserialised by the C library), whose answers are also checked against the decode.

Run from the repository root:

    python benchmarks/codecs.py --quick          # d = 35,439,360 at density 1%, bfuse8 and exact (< 1 min)
    python benchmarks/codecs.py                  # d in {1M, 10M, 35,439,360} x {0.1%, 1%, 5%} x 6 codecs
    DELTAMASK_KERNEL=numpy python benchmarks/codecs.py --quick   # the NumPy decode path only
    python benchmarks/codecs.py --d 1000000 --density 0.01 --codecs bfuse8 xor8 --seed 3

One JSON object per line on stdout (progress and a closing summary go to stderr through logging):

    codec                    codec name (bfuse8, bfuse16, xor8, xor16, exact, rawmask)
    d                        number of masked parameters
    density                  requested fraction of positions kept
    positions                k, the number of positions coded (for rawmask: the number of flipped positions)
    encode_s                 seconds to encode (median over `repeats`)
    decode_s                 seconds to decode the payload and materialise all flips (median over `repeats`)
    payload_bytes            bytes of the whole payload, frame included
    bpp                      payload bits per parameter (8 * payload_bytes / d)
    bits_per_position        payload bits per coded position (8 * payload_bytes / k)
    false_flips              decoded flips not in the input (filters: false positives; exact and rawmask: 0)
    floor_bits_per_position  the floor per position: b fingerprint bits for a filter, log2 C(d, k) / k otherwise
    floor_ratio              bits_per_position / floor_bits_per_position
    fpr                      measured false-positive rate, false_flips / (d - k)
    fpr_nominal              the codec's nominal false-positive rate (2**-b for filters, 0 otherwise)
    repeats                  timing repeats behind the medians
  filter rows only:
    per_key_decode_s         pyfusefilter public API, contains() per key, extrapolated to d lookups
                             (null when k > 2,000,000: building that filter is skipped)
    decode_speedup           per_key_decode_s / decode_s (null when per_key_decode_s is)
    per_key_c_decode_s       the C *_contain per key through cffi on the payload's filter, extrapolated to d
    c_decode_speedup         per_key_c_decode_s / decode_s
    per_key_sample           number of random lookups timed for the per-key figures
    decode_path              "compiled" (the optional cffi kernel) or "numpy" (the reference path)
    c_sample_mismatches      sampled positions where the codec's decode and the C filter disagree (must be 0)

A decoded set missing an input position (a false negative) or a lossless codec with a false flip raises.
"""
import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

try:
    import deltamask  # noqa: F401
except ImportError:  # run as `python benchmarks/codecs.py` without the package installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyfusefilter
from pyfusefilter._xorfilter import ffi, lib

from deltamask.bits import bits_per_position, bpp, exact_floor_bits, filter_floor_bits, payload_bits
from deltamask.codecs import CODECS, MASK, Codec, decode
from deltamask.codecs import kernel
from deltamask.codecs.base import read_frame
from deltamask.codecs.filters import FilterCodec

LOG = logging.getLogger("benchmarks.codecs")

FULL_DS = (1_000_000, 10_000_000, 35_439_360)
FULL_DENSITIES = (0.001, 0.01, 0.05)
QUICK_DS = (35_439_360,)
QUICK_DENSITIES = (0.01,)
QUICK_CODECS = ("bfuse8", "exact")
THETA = 0.99  # probability of a one in the reference mask behind the rawmask input
REPEAT_UP_TO_D = 10_000_000  # settings up to this d are timed `repeats` times, larger ones once
PUBLIC_API_MAX_KEYS = 2_000_000  # above this, the public-API filter is not built
PUBLIC_API = {"binary_fuse8": pyfusefilter.Fuse8, "binary_fuse16": pyfusefilter.Fuse16,
              "xor8": pyfusefilter.Xor8, "xor16": pyfusefilter.Xor16}

Row = Dict[str, object]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="only d = 35,439,360 at density 0.01 for bfuse8 and exact")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--d", type=int, nargs="+", help="values of d (overrides the default set)")
    p.add_argument("--density", type=float, nargs="+", help="densities (overrides the default set)")
    p.add_argument("--codecs", nargs="+", choices=list(CODECS), help="codecs (overrides the default set)")
    p.add_argument("--repeats", type=int, default=3,
                   help=f"timing repeats for d <= {REPEAT_UP_TO_D:,} (larger d: 1); default 3")
    p.add_argument("--sample", type=int, default=20_000,
                   help="random lookups timed for the per-key figures (default 20000)")
    args = p.parse_args(argv)
    for d in args.d or ():
        if d <= 0:
            p.error(f"--d must be positive, got {d}")
    for density in args.density or ():
        if not 0.0 <= density <= 1.0:
            p.error(f"--density must lie in [0, 1], got {density}")
    if args.repeats < 1 or args.sample < 1:
        p.error("--repeats and --sample must be at least 1")
    return args


def settings(args: argparse.Namespace) -> Tuple[Tuple[int, ...], Tuple[float, ...], Tuple[str, ...]]:
    """The d values, densities and codec names to run."""
    ds, densities, codecs = (QUICK_DS, QUICK_DENSITIES, QUICK_CODECS) if args.quick else \
        (FULL_DS, FULL_DENSITIES, tuple(n for n, c in CODECS.items() if not c.conditional and c.carries != "weights"))
    return tuple(args.d or ds), tuple(args.density or densities), tuple(args.codecs or codecs)


def setting_rng(seed: int, d: int, density: float, stream: int) -> np.random.Generator:
    """A generator for one (d, density) setting, independent of which other settings run."""
    return np.random.default_rng([seed, d, int(round(density * 1e9)), stream])


def draw_positions(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    """Exactly k unique positions in [0, d), uniformly at random, sorted int64."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if 4 * k > d:  # dense: a permutation is cheap enough and never retries
        return np.sort(rng.permutation(d)[:k]).astype(np.int64)
    # draws expected to give k distinct values, plus a margin; top up in the rare short case
    m = int(1.02 * -d * math.log1p(-k / d)) + 64
    chosen = np.unique(rng.integers(0, d, size=m, dtype=np.int64))
    while len(chosen) < k:
        chosen = np.union1d(chosen, rng.integers(0, d, size=2 * (k - len(chosen)) + 64, dtype=np.int64))
    if len(chosen) > k:  # a uniform k-subset of a uniform random set is a uniform k-subset
        chosen = np.sort(rng.choice(chosen, size=k, replace=False))
    return chosen


def client_mask(rng: np.random.Generator, d: int, positions: np.ndarray) -> np.ndarray:
    """A realistic client mask: a theta = 0.99 reference mask with `positions` flipped."""
    mask = rng.random(d) < THETA
    mask[positions] ^= True
    return mask


def timed(fn: Callable[[], object], repeats: int) -> Tuple[float, object]:
    """Median wall time of `fn` over `repeats` calls, and the result of the last call."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def decode_flips(payload: bytes, d: int) -> np.ndarray:
    """The server's decode of a flip payload: every position it flips (sorted int64)."""
    return decode(payload, d).flip_positions()


def decode_mask(payload: bytes, d: int) -> np.ndarray:
    """The server's decode of a rawmask payload: the whole client mask."""
    return decode(payload, d).client_mask(np.zeros(d, dtype=bool), 0)


def count_false_flips(codec: Codec, positions: np.ndarray, decoded: np.ndarray) -> int:
    """Decoded flips outside the input set; raises on a missing input position."""
    found = np.isin(positions, decoded, assume_unique=True)
    if not found.all():
        missing = positions[~found]
        raise AssertionError(f"{codec.name}: {len(missing)} false negatives, "
                             f"e.g. positions {missing[:5].tolist()}")
    false_flips = int(np.count_nonzero(~np.isin(decoded, positions)))
    if false_flips and codec.false_positive_rate == 0.0:
        raise AssertionError(f"{codec.name} is lossless but decoded {false_flips} false flips")
    return false_flips


def count_mask_errors(codec: Codec, mask: np.ndarray, decoded: np.ndarray) -> int:
    """Positions where a decoded mask differs from the input mask; raises if there is any."""
    errors = int(np.count_nonzero(decoded != mask))
    if errors:
        raise AssertionError(f"{codec.name}: decoded mask differs from the input at {errors} positions")
    return errors


def time_per_key(contains: Callable[[int], object], sample: List[int]) -> float:
    """Seconds per lookup, calling `contains` once per sampled key."""
    t0 = time.perf_counter()
    for i in sample:
        contains(i)
    return (time.perf_counter() - t0) / len(sample)


def public_api_per_key(codec: FilterCodec, positions: np.ndarray, sample: List[int]) -> Optional[float]:
    """Seconds per lookup through pyfusefilter's public API (None when k is too large to build)."""
    if len(positions) > PUBLIC_API_MAX_KEYS:
        LOG.info("  %s: k = %d > %d, public-API filter not built", codec.name, len(positions), PUBLIC_API_MAX_KEYS)
        return None
    t0 = time.perf_counter()
    filt = PUBLIC_API[codec.kind](positions.tolist())
    LOG.info("  %s: public-API %s built in %.2f s", codec.name, type(filt).__name__, time.perf_counter() - t0)
    return time_per_key(filt.contains, sample)


def c_per_key(codec: FilterCodec, payload: bytes, d: int, sample: List[int],
              decoded: np.ndarray) -> Tuple[float, int]:
    """Seconds per lookup through the C *_contain (cffi), one key at a time, on the very filter in
    `payload` (its header and fingerprints deserialised by the C library), and the number of sampled
    positions where the C answer differs from `decoded` (the codec's decode)."""
    kind = codec.kind
    update = decode(payload, d)
    fingerprints = update.fingerprints
    raw = read_frame(payload).header + fingerprints.astype(fingerprints.dtype.newbyteorder("<")).tobytes()
    filt = ffi.new(f"{kind}_t *")
    if not getattr(lib, f"{kind}_deserialize")(filt, ffi.from_buffer(raw)):
        raise MemoryError(f"{kind}: cannot deserialise the payload's filter")
    try:
        contain = getattr(lib, f"{kind}_contain")
        per_key = time_per_key(lambda i: contain(i, filt), sample)
        c_answers = np.fromiter((contain(i, filt) for i in sample), dtype=bool, count=len(sample))
    finally:
        getattr(lib, f"{kind}_free")(filt)
    ours = np.isin(np.asarray(sample, dtype=np.int64), decoded)
    return per_key, int(np.count_nonzero(c_answers != ours))


def ratio(num: Optional[float], den: float) -> Optional[float]:
    return num / den if num is not None and den > 0 else None


def bench_codec(codec: Codec, d: int, density: float, positions: np.ndarray,
                mask: Optional[np.ndarray], sample: List[int], repeats: int) -> Row:
    """Encode, decode and check one codec on one input; the row of results."""
    k = len(positions)
    if codec.carries == MASK:
        encode_s, payload = timed(lambda: codec.encode(mask, d), repeats)
        decode_s, decoded = timed(lambda: decode_mask(payload, d), repeats)
        false_flips = count_mask_errors(codec, mask, decoded)
    else:
        encode_s, payload = timed(lambda: codec.encode(positions, d), repeats)
        decode_s, decoded = timed(lambda: decode_flips(payload, d), repeats)
        false_flips = count_false_flips(codec, positions, decoded)
    bits = payload_bits(payload)
    if isinstance(codec, FilterCodec):
        floor = filter_floor_bits(k, codec.bits)
    else:
        floor = exact_floor_bits(d, k)
    row: Row = {
        "codec": codec.name, "d": d, "density": density, "positions": k,
        "encode_s": encode_s, "decode_s": decode_s, "payload_bytes": len(payload),
        "bpp": bpp(bits, d), "bits_per_position": bits_per_position(bits, k),
        "false_flips": false_flips, "floor_bits_per_position": bits_per_position(floor, k),
        "floor_ratio": ratio(float(bits), floor),
        "fpr": false_flips / (d - k) if d > k else 0.0, "fpr_nominal": codec.false_positive_rate,
        "repeats": repeats,
    }
    if isinstance(codec, FilterCodec):
        if k:
            public = public_api_per_key(codec, positions, sample)
            c_key, mismatches = c_per_key(codec, payload, d, sample, decoded)
        else:
            public, c_key, mismatches = None, None, 0
        if mismatches:
            LOG.error("  %s: decode and the C filter disagree at %d of %d sampled positions",
                      codec.name, mismatches, len(sample))
        row.update({
            "per_key_decode_s": public * d if public is not None else None,
            "decode_speedup": ratio(public * d if public is not None else None, decode_s),
            "per_key_c_decode_s": c_key * d if c_key is not None else None,
            "c_decode_speedup": ratio(c_key * d if c_key is not None else None, decode_s),
            "per_key_sample": len(sample),
            "c_sample_mismatches": mismatches,
        })
    return row


def bench_setting(d: int, density: float, codec_names: Iterable[str], seed: int,
                  repeats: int, sample_size: int) -> Iterable[Row]:
    """Rows for every codec on one (d, density): the same positions for all of them."""
    k = int(round(density * d))
    t0 = time.perf_counter()
    positions = draw_positions(setting_rng(seed, d, density, 0), d, k)
    sample = setting_rng(seed, d, density, 1).integers(0, d, size=sample_size).tolist()
    LOG.info("d = %d, density = %g: %d positions drawn in %.2f s", d, density, k, time.perf_counter() - t0)
    mask = None
    reps = repeats if d <= REPEAT_UP_TO_D else 1
    for name in codec_names:
        codec = CODECS[name]
        if codec.carries == MASK and mask is None:
            mask = client_mask(setting_rng(seed, d, density, 2), d, positions)
        t0 = time.perf_counter()
        row = bench_codec(codec, d, density, positions, mask, sample, reps)
        LOG.info("  %-7s %8.3f bits/position  encode %.3f s  decode %.3f s  false flips %d  (%.1f s)",
                 name, row["bits_per_position"], row["encode_s"], row["decode_s"], row["false_flips"],
                 time.perf_counter() - t0)
        yield row


def finite(row: Row) -> Row:
    """The row with NaN and infinities as null, so that every line is strict JSON."""
    return {key: (None if isinstance(v, float) and not math.isfinite(v) else v) for key, v in row.items()}


def summary(rows: List[Row], elapsed: float) -> str:
    """One line: rows, time, and per codec the median bits/position and decode speed-up."""
    parts = []
    for name in dict.fromkeys(r["codec"] for r in rows):
        mine = [r for r in rows if r["codec"] == name]
        bpps = [r["bits_per_position"] for r in mine if r["bits_per_position"] is not None]
        text = f"{name} {statistics.median(bpps):.2f} b/pos" if bpps else name
        speedups = [r["decode_speedup"] for r in mine if r.get("decode_speedup") is not None]
        if speedups:
            text += f" x{statistics.median(speedups):.0f} vs per-key"
        parts.append(text)
    return f"{len(rows)} rows in {elapsed:.1f} s; medians: " + ", ".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    ds, densities, codec_names = settings(args)
    LOG.info("codecs %s; d %s; densities %s; seed %d", ",".join(codec_names),
             ",".join(map(str, ds)), ",".join(map(str, densities)), args.seed)
    path = "compiled" if kernel.load() is not None else "numpy"  # built here, outside every timing
    LOG.info("filter membership path: %s (DELTAMASK_KERNEL=numpy forces the NumPy path)", path)
    t0 = time.perf_counter()
    rows: List[Row] = []
    for d in ds:
        for density in densities:
            for row in bench_setting(d, density, codec_names, args.seed, args.repeats, args.sample):
                if isinstance(CODECS[row["codec"]], FilterCodec):
                    row["decode_path"] = path
                row = finite(row)
                rows.append(row)
                print(json.dumps(row), flush=True)
    LOG.info("done: %s", summary(rows, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
