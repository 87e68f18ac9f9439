"""`deltamask-energy`: the paper's Table 4 on this device — time and energy per entry to encode and
decode N delta positions with each filter codec (xor8, xor16, bfuse8, bfuse16).

    deltamask-energy --entries 1000000 --meter rapl --json table4.json

All codecs run in one process on the same positions, one after another in each repeat, so their
ratios (BFuse8 vs Xor8, say) compare like with like. An entry is one position in the filter: encode
builds the filter over N positions and writes the payload; decode reads the payload and asks the
filter about every one of the d positions (`decode(payload, d).flip_positions()`), which is what the
server does. d defaults to 100 N — a 1% delta, the order of the deltas DeltaMask uploads — capped at
2^32 because decode time grows with d (about 5 ns a position on an x86 core), not memory (decode
works in 1 Mi-position chunks).
"""
import argparse
import ast
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from deltamask.codecs import decode, get_codec
from edge_client.energy import METERS, EnergyError, Meter, open_meter

CODECS = ("xor8", "xor16", "bfuse8", "bfuse16")
MAX_D = 1 << 32
RAPL_FILE = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
log = logging.getLogger(__name__)


def positions(n: int, d: int, seed: int) -> np.ndarray:
    """n distinct positions in [0, d), sorted, as uint64 (the keys the filters hold)."""
    return np.sort(np.random.default_rng(seed).choice(d, n, replace=False)).astype(np.uint64)


def measure(meter: Meter, keys: np.ndarray, d: int, repeat: int) -> List[Dict]:
    """Seconds and joules to encode and decode `keys` with each codec, averaged over `repeat` runs."""
    results = {name: {"codec": name, "encode_s": 0.0, "encode_j": 0.0, "decode_s": 0.0, "decode_j": 0.0}
               for name in CODECS}
    for name in CODECS:  # warm-up: load the C library and the compiled kernel outside the measurement
        decode(get_codec(name).encode(keys[:1000] % 10_000, 10_000), 10_000).flip_positions()
    for r in range(repeat):
        for name in CODECS:
            codec, row = get_codec(name), results[name]
            print(f"[{r + 1}/{repeat}] {name}: encode", end="", file=sys.stderr, flush=True)
            with meter.phase(f"{name}:encode") as enc:
                payload = codec.encode(keys, d)
            print(" decode", end="", file=sys.stderr, flush=True)
            with meter.phase(f"{name}:decode") as dec:
                flips = decode(payload, d).flip_positions()
            print(f" ({enc.seconds:.2f} s, {dec.seconds:.2f} s)", file=sys.stderr)
            found = np.searchsorted(flips, keys.astype(np.int64))
            if not np.array_equal(flips[np.minimum(found, len(flips) - 1)], keys.astype(np.int64)):
                raise RuntimeError(f"{name}: decode lost positions it was given")  # filters have no false negatives
            row.update(payload_bytes=len(payload), flips=int(len(flips)),
                       ok=row.get("ok", True) and enc.ok and dec.ok)
            for step, ph in (("encode", enc), ("decode", dec)):
                row[f"{step}_s"] += ph.seconds / repeat
                row[f"{step}_j"] += ph.joules / repeat
    return list(results.values())


def table(rows: List[Dict], n: int, d: int, energy: bool) -> str:
    """The Markdown table: per entry, nanoseconds and microjoules (decode also per queried position)."""
    def uj(j: float) -> str:
        return f"{j / n * 1e6:.4f}" if energy else "n/a"

    lines = ["| codec | bits/entry | encode ns/entry | encode uJ/entry | decode ns/entry | decode uJ/entry "
             "| decode ns/position | false-positive rate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['payload_bytes'] * 8 / n:.3f} | {r['encode_s'] / n * 1e9:.1f} | "
                     f"{uj(r['encode_j'])} | {r['decode_s'] / n * 1e9:.1f} | {uj(r['decode_j'])} | "
                     f"{r['decode_s'] / d * 1e9:.2f} | {(r['flips'] - n) / (d - n):.2e} |")
    return "\n".join(lines)


def _option(text: str):
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="deltamask-energy", description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=10_000_000, help="positions in the filter, N (default 10^7)")
    p.add_argument("--d", type=int, default=0, help="parameters, the positions decode queries "
                                                     "(default min(100 N, 2^32))")
    p.add_argument("--meter", choices=METERS, default="none")
    p.add_argument("--meter-option", action="append", default=[], metavar="KEY=VALUE", type=_option,
                   help="a meter option, e.g. shunt_ohms=0.1, max_current_a=3.2, rails=['VDD_IN']")
    p.add_argument("--rate-hz", type=float, default=20.0, help="meter sampling rate (Hz)")
    p.add_argument("--repeat", type=int, default=1, help="runs to average over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows and the set-up here")
    p.add_argument("--csv", type=Path, help="the meter's samples and phases")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    n = args.entries
    d = args.d or min(100 * n, MAX_D)
    if not 0 < n < d:
        p.error(f"need 0 < entries < d, got entries {n}, d {d}")
    try:
        meter = open_meter(args.meter, rate_hz=args.rate_hz, csv_path=args.csv, **dict(args.meter_option))
    except (EnergyError, ValueError) as exc:
        p.exit(2, f"deltamask-energy: {exc}\n")
    keys = positions(n, d, args.seed)
    started = time.time()
    with meter:
        rows = measure(meter, keys, d, args.repeat)
    energy = args.meter != "none"
    rapl = "present" if RAPL_FILE.exists() else f"not available on this machine ({RAPL_FILE} missing)"
    cpu = platform.processor() or platform.machine()
    print(f"Table 4 on {platform.node()} ({cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}): "
          f"N = {n:,} entries, d = {d:,} parameters, meter {args.meter}, mean of {args.repeat} run(s)\n")
    print(table(rows, n, d, energy))
    by = {r["codec"]: r for r in rows}
    print(f"\nBFuse8 / Xor8, same run: encode {by['bfuse8']['encode_s'] / by['xor8']['encode_s']:.2f}x, "
          f"decode {by['bfuse8']['decode_s'] / by['xor8']['decode_s']:.2f}x the time per entry.")
    if not energy:
        print(f"Energy not measured (--meter none). RAPL: {rapl}.")
    elif not all(r["ok"] for r in rows):
        print("WARNING: the meter failed or overflowed during some phases; their energy bridges the gaps.")
    if args.json:
        args.json.write_text(json.dumps({"entries": n, "d": d, "meter": args.meter, "repeat": args.repeat,
                                         "seed": args.seed, "started_unix": started, "machine": platform.node(),
                                         "rapl": rapl, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
