"""The model a federation leaves behind: the pretrained backbone with the kept round's mask applied (`keep: best`,
the default: the round the coordinator's evaluation scored highest, the head alone included; `keep: last`: the
last mask round, or the refit after it), and that round's head (the refit's own head for the refit round), as one
file that carries its preprocessing.

    deltamask-server export --config server.yaml --out model.onnx [--format onnx|torch] [--mask expected|sample|mode]
    deltamask-predict model.onnx shirt.png boot.jpg            # classes and scores (deltamask/predict.py)

Which mask: `expected` (default) scales every masked weight by its theta, w * theta: the mean of the
federation's stochastic mask, deterministic, and level with a sample or ahead of it in the engine's runs in
docs/results.md (the coordinator scores it after every mask round as `accuracy_expected`); `sample` is the seeded
sample of the final theta that the coordinator scored (`eval_seed` of that round: the paper's evaluation, the
round's `accuracy`); `mode` keeps every weight whose theta is at least 1/2 (`accuracy_mode`). The weights are
baked: w * m for every masked weight, so the file is a plain network of the backbone's size.

    onnx   an ONNX graph (opset 17): input "images" float32 (N, C, S, S) already preprocessed, output "logits"
           (N, classes); metadata_props["deltamask"] holds the JSON below.
    torch  a TorchScript file (torch.jit.load), the same JSON as its extra file "deltamask.json".

The JSON: backbone, blocks, image_size, channels, mean, std (preprocessing: scale to [0, 1], grayscale
repeated to 3 channels or colour to luma, resize to S x S bilinear, normalise per channel), class_names,
mask, round, phase (mask; refit: the mask with the head fitted on it; head when the head round is kept: every weight
kept, whichever mask), theta_sha256,
head_sha256, and the accuracy the coordinator reported for that round with that mask (null when the coordinator
does not evaluate).
"""
import json
import struct
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from deltamask.federation import BEST, HEAD, MASK, REFIT, eval_seed, kept_of
from deltamask.headwire import decode_head
from deltamask.predict import METADATA_KEY
from deltamask.sampling import sample_mask, theta_to_thresholds, thresholds_to_theta
from deltamask.thetawire import decode_theta, encode_theta, theta_digest
from deltamask.transfer import sha256_hex

FORMATS, MASKS = ("onnx", "torch"), ("expected", "sample", "mode")
# the key of the coordinator's round summary that scored each mask (deltamask.learn.learner.Evaluator)
SCORED_AS = {"expected": "accuracy_expected", "sample": "accuracy", "mode": "accuracy_mode"}


def final_state(config, facts) -> Dict:
    """The kept round of the coordinator's state (`keep: best`: the round that scored best on its held-out data,
    the head round's head alone included; `keep: last`: the last closed mask round): its theta and head as
    they travel (wire bytes, checked against the digests in the round's row) and what a model file records of
    it. ValueError when there is nothing to export yet."""
    from server.store import Store

    store = Store(config.state_dir)
    try:
        rows = [r for r in store.rounds() if r["state"] == "closed" and r["summary"]]
        masks = [r for r in rows if r["phase"] != HEAD]  # mask rounds, and the refit (the head on theta * w)
        kept = kept_of(config, [r["summary"] for r in rows]) if config.keep == BEST else None
        if kept is None and not masks:
            raise ValueError(f"{config.state_dir}: no closed round to export yet")
        row = next(r for r in rows if r["round"] == kept.round) if kept is not None else masks[-1]
        head_wire = store.load_head(refit=row["phase"] == REFIT)
        if row["phase"] == HEAD and not store.theta_path(row["round"] + 1).exists():  # pruned under keep: last;
            wire = encode_theta(theta_to_thresholds(np.full(facts.d, config.theta0)))  # a head round keeps theta0
        else:
            wire = store.load_theta(row["round"] + 1)
    except FileNotFoundError as exc:
        raise ValueError(f"{config.state_dir}: the theta of round {row['round']} is gone ({exc.filename})") from None
    finally:
        store.close()
    if theta_digest(wire) != row["summary"].get("next_theta_sha256"):
        raise ValueError(f"{config.state_dir}: the stored theta of round {row['round']} does not match its digest")
    phase = row["phase"]
    info = {"backbone": config.backbone, "blocks": config.blocks, "image_size": config.image_size,
            "num_classes": config.num_classes, "feature_dim": facts.feature_dim, "d": facts.d,
            "theta0": config.theta0, "class_names": class_names(config), "round": row["round"], "phase": phase,
            "seed": row["seed"], "accuracy": row["summary"].get("accuracy"),
            # after a head round every mask keeps every weight: the head alone, as the round was scored
            "accuracies": {m: row["summary"].get(key if phase != HEAD else "accuracy") for m, key in SCORED_AS.items()},
            "theta_sha256": theta_digest(wire),
            "head_sha256": sha256_hex(head_wire)}
    return {"info": info, "head_wire": head_wire, "wire": wire}


# The release: what `deltamask-ctl export` fetches (FetchModel) to build the same file away from the coordinator.
#   b"DMRL", u32 LE length of the JSON info, the JSON info (final_state's), u32 LE head length, the head wire,
#   then the theta wire (deltamask/thetawire.py) to the end.
_RELEASE = b"DMRL"


def pack_release(state: Dict) -> bytes:
    info = json.dumps(state["info"]).encode()
    return b"".join((_RELEASE, struct.pack("<I", len(info)), info, struct.pack("<I", len(state["head_wire"])),
                     state["head_wire"], state["wire"]))


def unpack_release(blob: bytes) -> Dict:
    """A release back into final_state's form; ValueError when it is not one or its digests do not hold."""
    try:
        if blob[:4] != _RELEASE:
            raise ValueError("not a deltamask release")
        (n,) = struct.unpack_from("<I", blob, 4)
        info = json.loads(blob[8:8 + n])
        (h,) = struct.unpack_from("<I", blob, 8 + n)
        head_wire, wire = blob[12 + n:12 + n + h], blob[12 + n + h:]
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"release garbled: {exc}") from None
    if sha256_hex(head_wire) != info.get("head_sha256") or theta_digest(wire) != info.get("theta_sha256"):
        raise ValueError("release garbled: a digest does not match")
    return {"info": info, "head_wire": head_wire, "wire": wire}


def final_mask(state: Dict, mask: str) -> np.ndarray:
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {mask!r}")
    thresholds = decode_theta(state["wire"], state["info"]["d"])
    if state["info"].get("phase", MASK) == HEAD:  # the head round kept: the backbone as it was
        return np.ones(len(thresholds), dtype=bool)
    if mask == "sample":
        return sample_mask(thresholds, eval_seed(state["info"]["seed"]))
    theta = thresholds_to_theta(thresholds)
    return theta if mask == "expected" else theta >= 0.5


def network(state: Dict, mask: str, weights: Optional[str] = "default"):
    """(the end-to-end torch module with the mask baked into its weights, its preprocessing)."""
    from torch import nn

    from deltamask.learn.learner import Model

    i = state["info"]
    model = Model(i["backbone"], weights, i["blocks"], i["image_size"], i["num_classes"], i["theta0"])
    if model.d != i["d"]:
        raise ValueError(f"{i['backbone']} here masks d = {model.d} weights, the release {i['d']}")
    model.set_head(decode_head(state["head_wire"], i["num_classes"], i["feature_dim"]))
    chosen = final_mask(state, mask)
    if mask == "expected" and chosen.dtype != bool:  # the evaluator's expected factor: sigmoid(logit(theta))
        model.masks.set_theta(chosen)
        chosen = model.masks.theta()
    masked = model.masks.bake(chosen)
    net = nn.Sequential(model.backbone.prefix, masked, model.head).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, model.backbone.preprocessing


def export(config, facts, out: Path, fmt: str = "onnx", mask: str = "expected") -> Dict:
    """Write the coordinator's model to `out`; returns its metadata."""
    return write_model(final_state(config, facts), out, fmt, mask, config.weights)


def write_model(state: Dict, out: Path, fmt: str = "onnx", mask: str = "expected",
                weights: Optional[str] = "default") -> Dict:
    """The model of a final state (or an unpacked release) as one file; returns its metadata."""
    import torch

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    net, pre = network(state, mask, weights)
    i = state["info"]
    if pre.kind != "image":
        raise ValueError(f"export takes image backbones; {i['backbone']} reads {pre.kind}")
    meta = {"backbone": i["backbone"], "blocks": i["blocks"], "image_size": pre.size, "channels": pre.channels,
            "mean": list(pre.mean), "std": list(pre.std), "class_names": i["class_names"], "mask": mask,
            "round": i["round"], "phase": i.get("phase", MASK), "theta_sha256": i["theta_sha256"],
            "head_sha256": i["head_sha256"],
            "accuracy": i.get("accuracies", {}).get(mask, i["accuracy"] if mask == "sample" else None)}
    example = torch.zeros(1, pre.channels, pre.size, pre.size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch":
        traced = torch.jit.trace(net, example)
        torch.jit.save(traced, str(out), _extra_files={"deltamask.json": json.dumps(meta)})
        return meta
    import io

    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(net, (example,), buffer, dynamo=False, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}}, opset_version=17)
    graph = onnx.load_from_string(buffer.getvalue())
    graph.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    onnx.save(graph, str(out))
    return meta


def class_names(config) -> list:
    """The evaluation dataset's class names when the coordinator has one configured, else the indices."""
    if config.evaluation is not None:
        try:
            from deltamask.data import load_dataset

            names = list(load_dataset(config.evaluation.dataset, "test", config.evaluation.root).class_names)
            if len(names) == config.num_classes:
                return names
        except Exception:  # a missing dataset only costs the names
            pass
    return [str(i) for i in range(config.num_classes)]


__all__ = ["FORMATS", "MASKS", "SCORED_AS", "class_names", "export", "final_mask", "final_state", "network",
           "pack_release", "unpack_release", "write_model"]
