"""The model a federation leaves behind: the pretrained backbone with the final mask applied, and the head, as
one file that carries its preprocessing.

    deltamask-server export --config server.yaml --out model.onnx [--format onnx|torch] [--mask sample|mode]
    deltamask-predict model.onnx shirt.png boot.jpg            # classes and scores (deltamask/predict.py)

Which mask: `sample` (default) is the seeded sample of the final theta that the coordinator scored after its
last mask round (`eval_seed` of that round: the paper's evaluation, and the accuracy the round reported);
`mode` keeps every weight whose theta is at least 1/2 (deterministic; docs/results.md compares the two).
The weights are baked: w * m for every masked weight, so the file is a plain network.

    onnx   an ONNX graph (opset 17): input "images" float32 (N, C, S, S) already preprocessed, output "logits"
           (N, classes); metadata_props["deltamask"] holds the JSON below.
    torch  a TorchScript file (torch.jit.load), the same JSON as its extra file "deltamask.json".

The JSON: backbone, blocks, image_size, channels, mean, std (preprocessing: scale to [0, 1], grayscale
repeated to 3 channels or colour to luma, resize to S x S bilinear, normalise per channel), class_names,
mask, round, theta_sha256, head_sha256, and the accuracy the coordinator reported for that round.
"""
import json
from pathlib import Path
from typing import Dict

import numpy as np

from deltamask.federation import MASK, eval_seed
from deltamask.headwire import decode_head
from deltamask.predict import METADATA_KEY
from deltamask.sampling import sample_mask, thresholds_to_theta
from deltamask.thetawire import decode_theta, theta_digest
from deltamask.transfer import sha256_hex

FORMATS, MASKS = ("onnx", "torch"), ("sample", "mode")


def final_state(config, facts) -> Dict:
    """The last closed mask round of the coordinator's state: theta (thresholds), head, the mask to bake's
    seed, the summary it reported. ValueError when no mask round has closed yet."""
    from server.store import Store

    store = Store(config.state_dir)
    try:
        rounds = [r for r in store.rounds() if r["state"] == "closed" and r["phase"] == MASK and r["summary"]]
        if not rounds:
            raise ValueError(f"{config.state_dir}: no closed mask round to export yet")
        last = rounds[-1]
        wire, head_wire = store.load_theta(last["round"] + 1), store.load_head()
    finally:
        store.close()
    if theta_digest(wire) != last["summary"].get("theta_sha256"):
        raise ValueError(f"{config.state_dir}: the stored theta of round {last['round']} does not match its digest")
    head = decode_head(head_wire, config.num_classes, facts.feature_dim)
    return {"round": last["round"], "seed": last["seed"], "thresholds": decode_theta(wire, facts.d),
            "head": head, "summary": last["summary"], "theta_sha256": theta_digest(wire),
            "head_sha256": sha256_hex(head_wire)}


def final_mask(state: Dict, mask: str) -> np.ndarray:
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {mask!r}")
    if mask == "sample":
        return sample_mask(state["thresholds"], eval_seed(state["seed"]))
    return thresholds_to_theta(state["thresholds"]) >= 0.5


def network(config, state: Dict, mask: str):
    """(the end-to-end torch module with the mask baked into its weights, its preprocessing)."""
    import torch
    from torch import nn

    from deltamask.learn.learner import Model

    model = Model(config.backbone, config.weights, config.blocks, config.image_size, config.num_classes,
                  config.theta0)
    model.set_head(state["head"])
    masked = model.masks.bake(final_mask(state, mask))
    net = nn.Sequential(model.backbone.prefix, masked, model.head).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, model.backbone.preprocessing


def export(config, facts, out: Path, fmt: str = "onnx", mask: str = "sample") -> Dict:
    """Write the model to `out`; returns its metadata."""
    import torch

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    state = final_state(config, facts)
    net, pre = network(config, state, mask)
    if pre.kind != "image":
        raise ValueError(f"export takes image backbones; {config.backbone} reads {pre.kind}")
    meta = {"backbone": config.backbone, "blocks": config.blocks, "image_size": pre.size, "channels": pre.channels,
            "mean": list(pre.mean), "std": list(pre.std), "class_names": class_names(config), "mask": mask,
            "round": state["round"], "theta_sha256": state["theta_sha256"], "head_sha256": state["head_sha256"],
            "accuracy": state["summary"].get("accuracy")}
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


__all__ = ["FORMATS", "MASKS", "class_names", "export", "final_mask", "final_state", "network"]
