"""deltamask-sim: an in-process federation over the same core functions the coordinator and agent use.

    deltamask-sim --rounds 20 --clients 10 --codec bfuse8            # one JSON line a round on stdout

Round 0 is the linear-probing round (the head, averaged over clients, is then frozen); every later
round is one round of DeltaMask: global theta -> wire -> each sampled client trains and encodes ->
the server rebuilds each mask (digest checked) -> Beta counts -> theta.
"""
import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import nn

from deltamask.aggregation import MODE, BetaCounts, reset_due
from deltamask.codecs import MASK, get_codec
from deltamask.codecs import decode as decode_payload
from deltamask.delta import cosine_kappa
from deltamask.errors import DeltaMaskError
from deltamask.masking import FIXED, IDENTITY, MaskedModule
from deltamask.rounds import client_update, rebuild_client_mask
from deltamask.sampling import PER_CLIENT, reference_mask, round_seed, sample_mask, theta_to_thresholds, thresholds_to_theta
from deltamask.thetawire import decode_theta, encode_theta
from deltamask.training import (TrainSettings, average_heads, evaluate, features_of, head_bits, kaiming_head,
                                lda_head, lda_statistics, linear_probe, take, train_mask)

log = logging.getLogger(__name__)
HEADS = ("linear_probe", "lda", "kaiming")


@dataclass(frozen=True)
class SimConfig:
    backbone: str = "mobilenet_v2"
    weights: Optional[str] = "default"
    blocks: int = 5
    image_size: int = 64
    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    train_samples: int = 6000  # a training subset, split over the clients
    test_samples: int = 2000
    clients: int = 10
    rho: float = 1.0
    alpha: float = 10.0  # Dirichlet concentration over classes (10: IID-like, 0.1: non-IID)
    min_per_client: int = 10
    rounds: int = 20  # mask rounds, after the linear-probing round
    codec: str = "bfuse8"
    kappa_start: float = 0.8
    kappa_end: float = 1.0
    reference: str = PER_CLIENT
    theta_formula: str = MODE
    lambda0: float = 1.0
    theta0: float = 0.99
    estimator: str = IDENTITY
    head: str = "linear_probe"
    probe_epochs: int = 20
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.1
    seed: int = 0


class Federation:
    """The simulated fleet: a backbone split once, each client's cached prefix outputs, the server state."""

    def __init__(self, config: SimConfig) -> None:
        from deltamask.data import dirichlet_partition, load_dataset, prepare_images
        from deltamask.models import load_backbone
        from deltamask.prefix_cache import run_prefix

        self.config = c = config
        torch.manual_seed(c.seed)
        backbone = load_backbone(c.backbone, weights=c.weights, blocks=c.blocks, size=c.image_size)
        pre = backbone.preprocessing
        train, test = load_dataset(c.dataset, "train", c.data_root), load_dataset(c.dataset, "test", c.data_root)
        train_x, train_y = _subset(train.images, train.labels, c.train_samples, c.seed)
        test_x, test_y = _subset(test.images, test.labels, c.test_samples, c.seed + 1)
        self.num_classes = int(max(train_y.max(), test_y.max())) + 1
        self.parts = dirichlet_partition(train_y, c.clients, c.alpha, min_per_client=c.min_per_client, seed=c.seed)

        def prefix(images: np.ndarray):
            tensor = prepare_images(images, c.image_size, pre.channels, pre.mean, pre.std)
            return run_prefix(backbone, torch.split(tensor, 256))

        started = time.perf_counter()
        self.train_in, self.test_in = prefix(train_x), prefix(test_x)
        self.prefix_s = time.perf_counter() - started
        self.train_y, self.test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
        self.masks = MaskedModule(backbone.masked, c.theta0, c.estimator, seed=c.seed)
        self.d = self.masks.d
        self.head: nn.Linear = nn.Linear(backbone.feature_dim, self.num_classes)
        self.net = nn.Sequential(backbone.masked, self.head)
        self.codec = get_codec(c.codec)
        self.counts = BetaCounts(self.d, c.lambda0)
        self.theta = np.full(self.d, c.theta0, dtype=np.float64)
        self.client_ids = [f"client-{k:03d}" for k in range(c.clients)]

    def client_data(self, k: int):
        index = torch.as_tensor(self.parts[k])
        return take(self.train_in, index), self.train_y[index]

    def head_round(self) -> Dict:
        """Round 0: fit the classifier head on the frozen, unmasked backbone; it stays frozen after."""
        c, started = self.config, time.perf_counter()
        self.masks.set_mode(FIXED, np.ones(self.d, dtype=bool))
        bits = 0
        if c.head == "kaiming":
            new_head = kaiming_head(self.head.in_features, self.num_classes, c.seed)
        else:
            shares, sizes = [], []
            for k in range(c.clients):
                inputs, labels = self.client_data(k)
                feats = features_of(self.net[0], inputs)
                if c.head == "lda":
                    shares.append(lda_statistics(feats, labels, self.num_classes))
                    bits += 32 * sum(s.numel() for s in shares[-1])
                else:
                    shares.append(linear_probe(feats, labels, self.num_classes, c.probe_epochs, seed=c.seed + k))
                    bits += head_bits(shares[-1])
                sizes.append(len(labels))
            new_head = lda_head(shares) if c.head == "lda" else average_heads(shares, sizes)
        self.head.load_state_dict(new_head.state_dict())
        for p in self.head.parameters():
            p.requires_grad_(False)
        accuracy = evaluate(self.net, self.masks, self.test_in, self.test_y, mask=np.ones(self.d, dtype=bool))
        return {"round": 0, "phase": "head", "head": c.head, "accuracy": accuracy,
                "uplink_bpp": bits / c.clients / self.d, "clients": c.clients,
                "time_s": round(time.perf_counter() - started, 3)}

    def mask_round(self, r: int, progress=None) -> Dict:
        """One round of DeltaMask (r >= 1)."""
        c = self.config
        seed = round_seed(c.seed, r)
        k = max(1, int(round(c.rho * c.clients)))
        chosen = sorted(np.random.default_rng(seed).choice(c.clients, size=k, replace=False).tolist())
        kappa = cosine_kappa(r - 1, c.rounds, c.kappa_start, c.kappa_end)
        wire = encode_theta(theta_to_thresholds(self.theta))
        if reset_due(r - 1, c.rho):
            self.counts.reset()
        rows, times = [], {"train_s": 0.0, "encode_s": 0.0, "decode_s": 0.0}
        for client in chosen:
            cid = self.client_ids[client]
            thresholds = decode_theta(wire, self.d)  # what the client receives
            inputs, labels = self.client_data(client)
            started = time.perf_counter()
            theta_k = train_mask(self.net, self.masks, thresholds_to_theta(thresholds), inputs, labels,
                                 TrainSettings(c.epochs, c.batch_size, c.lr, seed=seed % 2**31 + client))
            trained = time.perf_counter()
            upload = client_update(thresholds, theta_k, seed, cid, kappa, self.codec, c.reference)
            encoded = time.perf_counter()
            packed, digest = rebuild_client_mask(decode_payload(upload.payload, self.d), thresholds, seed, cid,
                                                 c.reference)
            decoded = time.perf_counter()
            if digest != upload.reference_digest:
                raise RuntimeError(f"{cid}: reference digest mismatch")
            self.counts.add_packed(packed)
            rebuilt = np.unpackbits(packed, bitorder="little")[: self.d].astype(bool)
            applied = int(np.count_nonzero(rebuilt != reference_mask(thresholds, seed, cid, c.reference)))
            rows.append({"bits": 8 * len(upload.payload), "delta": upload.delta, "kept": upload.kept,
                         "applied": applied,
                         "false": 0 if self.codec.carries == MASK else applied - upload.kept})
            times["train_s"] += trained - started
            times["encode_s"] += encoded - trained
            times["decode_s"] += decoded - encoded
            if progress is not None:
                progress()
        self.theta = self.counts.theta(c.theta_formula, previous=self.theta)
        started = time.perf_counter()
        self.masks.set_theta(self.theta)
        expected = evaluate(self.net, self.masks, self.test_in, self.test_y)
        sampled_mask = sample_mask(theta_to_thresholds(self.theta), round_seed(c.seed, -r))
        sampled = evaluate(self.net, self.masks, self.test_in, self.test_y, mask=sampled_mask)
        return {"round": r, "phase": "mask", "kappa": round(kappa, 4), "clients": len(chosen),
                "accuracy": sampled, "accuracy_expected": expected,
                "uplink_bpp": float(np.mean([x["bits"] for x in rows])) / self.d,
                "downlink_bpp": 8 * len(wire) / self.d,
                "delta_fraction": float(np.mean([x["delta"] for x in rows])) / self.d,
                "kept": float(np.mean([x["kept"] for x in rows])),
                "flips_applied": float(np.mean([x["applied"] for x in rows])),
                "false_flips": float(np.mean([x["false"] for x in rows])),
                "theta_mean": float(self.theta.mean()),
                **{key: round(v, 3) for key, v in times.items()},
                "eval_s": round(time.perf_counter() - started, 3)}


def run(config: SimConfig, progress: bool = True) -> Iterator[Dict]:
    """Yield one dict a round: the head round, then `config.rounds` mask rounds."""
    fed = Federation(config)
    log.info("d = %d masked parameters; prefix outputs computed once in %.1f s", fed.d, fed.prefix_s)
    yield {**fed.head_round(), "d": fed.d, "prefix_s": round(fed.prefix_s, 3)}
    bar = _progress(config.rounds * max(1, int(round(config.rho * config.clients))), progress)
    for r in range(1, config.rounds + 1):
        yield fed.mask_round(r, progress=bar.update if bar else None)
    if bar:
        bar.close()


def _subset(images: np.ndarray, labels: np.ndarray, n: int, seed: int):
    if n <= 0 or n >= len(labels):
        return images, labels
    index = np.sort(np.random.default_rng(seed).permutation(len(labels))[:n])
    return images[index], labels[index]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="client updates", unit="client", file=sys.stderr)


def parse_args(argv: Optional[List[str]] = None) -> SimConfig:
    parser = argparse.ArgumentParser(prog="deltamask-sim", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(SimConfig):
        kind = {int: int, float: float}.get(type(f.default), str)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                            help=f"default: {f.default}")
    args = vars(parser.parse_args(argv))
    if args["weights"] in ("none", "None", ""):
        args["weights"] = None
    return SimConfig(**args)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    config = parse_args(argv)
    print(json.dumps({"config": dataclasses.asdict(config)}), flush=True)
    try:
        for row in run(config):
            print(json.dumps(row), flush=True)
    except DeltaMaskError as exc:  # a missing dataset or weight file, an empty client: say what, no traceback
        print(f"deltamask-sim: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
