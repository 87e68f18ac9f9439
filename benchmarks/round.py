"""How long the coordinator takes to close a round at CLIP ViT-B/32 scale: one JSON object on stdout.

    python benchmarks/round.py                    # d = 35,439,360, 6 uploads of 1% density, 2 mask rounds
    python benchmarks/round.py --d 1000000 --uploads 3

`round_close_s` is the time from the last upload's bytes being in hand to the next round's theta being
available: decode and rebuild that upload, check its digest, add it to the counts, persist it, then
close (theta from the counts, theta wire, counts and theta written and fsynced, round row committed).
The other uploads are decoded as they arrive, before that clock starts, as in the server. Uploads are
made by the client code (`deltamask.rounds.client_update`) from a theta_k that differs from theta_g
at `density` of the positions, with kappa = 1, so that about `density` x d positions are coded.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deltamask.codecs import get_codec  # noqa: E402
from deltamask.headwire import encode_head  # noqa: E402
from deltamask.rounds import client_update  # noqa: E402
from deltamask.sampling import thresholds_to_theta  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.coordinator import Coordinator, ModelFacts  # noqa: E402
from server.store import Store  # noqa: E402

TARGET_S = 3.0
FEATURES, CLASSES = 768, 10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=35_439_360)
    parser.add_argument("--uploads", type=int, default=6)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--codec", default="bfuse8")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as state:
        config = ServerConfig(state_dir=state, backbone=None, d=args.d, num_classes=CLASSES,
                              expected_clients=args.uploads, min_quorum=args.uploads, rounds=args.rounds,
                              codec=args.codec, kappa_start=1.0, kappa_end=1.0, heartbeat_interval_s=3600,
                              head="linear_probe")
        store = Store(state)
        c = Coordinator(config, ModelFacts(args.d, "", FEATURES), store)
        names = [f"bench-{i}" for i in range(args.uploads)]
        devices = [c.register(name, "server", 0, args.codec).device_id for name in names]
        for dev in devices:
            c.get_task(dev, -1, 0)  # ready
        c.step()  # the head round opens
        head = encode_head(np.zeros((CLASSES, FEATURES)), np.zeros(CLASSES))
        for dev in devices:
            c.submit(dev, 0, head, "", {"num_examples": 1})
        c.step()  # closes the head round
        rng = np.random.default_rng(0)
        rounds = []
        for _ in range(args.rounds):
            c.step()  # opens a mask round
            r = c.open
            uploads, make_s = [], time.perf_counter()
            for name in names:  # masks are seeded by the enrolled name
                theta_k = thresholds_to_theta(c.thresholds).astype(np.float32)
                moved = rng.choice(args.d, int(args.density * args.d), replace=False)
                theta_k[moved] = 1.0 - theta_k[moved]  # flips the own sample there, whatever theta_g is
                uploads.append(client_update(c.thresholds, theta_k, r.seed, name, r.kappa, get_codec(args.codec)))
            make_s = time.perf_counter() - make_s
            for dev, up in zip(devices[:-1], uploads[:-1]):
                c.submit(dev, r.round, up.payload, up.reference_digest, {})
            started = time.perf_counter()
            c.submit(devices[-1], r.round, uploads[-1].payload, uploads[-1].reference_digest, {})
            c.step()  # every upload is in: the round closes
            round_close_s = time.perf_counter() - started
            summary = c.history[-1]
            assert summary["round"] == r.round and summary["state"] == "closed" and c.wire
            rounds.append({"round": r.round, "round_close_s": round(round_close_s, 3),
                           "last_decode_s": round(r.decode_s[devices[-1]], 3), "close_s": summary["close_s"],
                           "kept_density": round(float(np.mean([u.kept for u in uploads])) / args.d, 5),
                           "uplink_bpp": round(summary["uplink_bpp"], 4), "downlink_bpp": round(summary["downlink_bpp"], 4),
                           "theta_bytes": len(c.wire), "client_encode_s": round(make_s / args.uploads, 3)})
        store.close()
    worst = max(r["round_close_s"] for r in rounds)
    print(json.dumps({"benchmark": "round_close", "d": args.d, "uploads": args.uploads, "codec": args.codec,
                      "round_close_s": worst, "target_s": TARGET_S, "within_target": worst <= TARGET_S,
                      "rounds": rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
