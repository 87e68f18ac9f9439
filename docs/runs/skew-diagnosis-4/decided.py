"""Which positions can a federation still move? From copies of a `deltamask-sim --checkpoint` file taken after
every round (`watch.sh`), one JSON line a mask round: the share of d where the served theta is undecided
(0 < theta < 1), pruned (theta = 0), and how much of it the first mask round already left undecided; and the
share of the positions decided at 1 after round 1 that have left 1 since (the frozen part).

    python docs/runs/skew-diagnosis-4/decided.py SNAPSHOT_DIR > decided.jsonl
"""
import glob
import json
import sys

import numpy as np

from deltamask.sampling import ONE
from deltamask.thetawire import decode_theta


def rounds(folder):
    out = []
    for path in glob.glob(folder + "/*.npz"):
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta["masks_done"]:
                out.append((meta["masks_done"], decode_theta(z["wire"].tobytes(), len(z["ones"]))))
    return sorted(out, key=lambda r: r[0])


def main(folder: str) -> None:
    seen = rounds(folder)
    first = seen[0][1]
    open_after_1 = (first > 0) & (first < ONE)
    frozen, moved = first == ONE, np.zeros(len(first), bool)
    for k, theta in seen:
        undecided = (theta > 0) & (theta < ONE)
        moved |= frozen & (theta != ONE)
        print(json.dumps({"mask_rounds": k, "undecided": round(float(undecided.mean()), 6),
                          "pruned": round(float((theta == 0).mean()), 6),
                          "undecided_after_round_1": round(float(open_after_1.mean()), 6),
                          "undecided_of_those_open_after_round_1": round(float((undecided & open_after_1).sum()
                                                                                 / max(1, undecided.sum())), 4),
                          "decided_at_1_after_round_1_moved_since": round(float(moved.sum() / frozen.sum()), 6)}))


if __name__ == "__main__":
    main(sys.argv[1])
