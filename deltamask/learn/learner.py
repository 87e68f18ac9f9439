"""A device's side of the federation, for the simulator and the agent alike: the model split for masking,
the device's examples through the frozen prefix (once), and one round's work -> the bytes it uploads.
Also the held-out evaluation the simulator and the coordinator report.

    model = Model("mobilenet_v2", "default", blocks=5, image_size=64, num_classes=10)
    learner = LocalLearner(model, model.prefix(images), labels)   # or inputs from the prefix cache
    reply = learner.work(task, name, head, thresholds)                   # -> Reply(payload, digest, ...)
"""
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from deltamask.codecs import WEIGHTS, get_codec
from deltamask.federation import (HEAD, LDA, REFIT, THRESHOLD, VIRTUAL_CLASSES, DeviceTask, Head, lda_projection,
                                  train_seed)
from deltamask.headwire import encode_head, encode_lda_stats, lda_width
from deltamask.learn.masking import EXPECTED, FIXED, IDENTITY, MaskedModule
from deltamask.learn import prefix_cache
from deltamask.learn.prefix_cache import run_prefix
from deltamask.learn.training import (Inputs, class_sums, evaluate, features_of, lda_statistics, linear_probe,
                                     num_rows, train_mask, train_weights)
from deltamask.rounds import client_update
from deltamask.sampling import sample_mask, thresholds_to_theta

log = logging.getLogger(__name__)


class Model:
    """A backbone split for masking: the frozen prefix, the masked last blocks and a frozen linear head."""

    def __init__(self, backbone: str, weights: Optional[str], blocks: int, image_size: int, num_classes: int,
                 theta0: float = 0.99, estimator: str = IDENTITY) -> None:
        from deltamask.learn.models import load_backbone

        self.backbone = load_backbone(backbone, weights=weights, blocks=blocks, size=image_size)
        self.image_size = image_size
        self.masks = MaskedModule(self.backbone.masked, theta0, estimator)
        self.d, self.num_classes, self.feature_dim = self.masks.d, num_classes, self.backbone.feature_dim
        self.head = nn.Linear(self.feature_dim, num_classes)
        for p in self.head.parameters():
            p.requires_grad_(False)
        self.net = nn.Sequential(self.backbone.masked, self.head)
        self._pretrained: Optional[np.ndarray] = None

    def set_offset(self, offset: np.ndarray) -> np.ndarray:
        """The fine-tuning baselines: set the masked layers' weights to pretrained + offset; returns them."""
        if self._pretrained is None:
            self._pretrained = self.masks.weights()
        weights = self._pretrained + np.asarray(offset, np.float32)
        self.masks.set_weights(weights)
        return weights

    def prefix(self, images: np.ndarray, progress: Callable = lambda batches: batches,
               cache: Optional[Path] = None, runtime: str = "auto") -> Inputs:
        """The frozen prefix's outputs for raw images, 256 at a time (what local training feeds the rest);
        with `cache`, kept there under a key of the backbone, its weights, the images and the runtime, and read
        back. `runtime`: auto (onnxruntime where it is measured faster, `deltamask.learn.onnx_prefix`),
        onnxruntime or torch."""
        from deltamask.data import prepare_images
        from deltamask.learn.onnx_prefix import prefix_runner, runtime_for

        resolved = runtime_for(self.backbone, runtime)
        extra = f"{self.image_size}" + ("|onnxruntime" if resolved == "onnxruntime" else "")
        key = prefix_cache.cache_key(self.backbone, images, extra) if cache else ""
        if cache is not None:
            hit = prefix_cache.load(cache, key)
            if hit is not None:
                return hit
        pre = self.backbone.preprocessing
        tensor = prepare_images(images, self.image_size, pre.channels, pre.mean, pre.std)
        outputs = run_prefix(self.backbone, progress(torch.split(tensor, 256)),
                             prefix_runner(self.backbone, resolved, cache))
        if cache is not None:
            prefix_cache.save(outputs, cache, key)
        return outputs

    @property
    def input_dim(self) -> int:
        """Numbers in one example of the masked blocks' inputs (the prefix's output), 0 for a text backbone:
        the width of the class anchors virtual_classes trains with."""
        pre = self.backbone.preprocessing
        if pre.kind != "image":
            return 0
        with torch.no_grad():
            return int(self.backbone.prefix(torch.zeros(1, pre.channels, self.image_size, self.image_size)).numel())

    def set_head(self, head: Head) -> None:
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(np.asarray(head[0], np.float32)))
            self.head.bias.copy_(torch.from_numpy(np.asarray(head[1], np.float32)))


@dataclass(frozen=True)
class Reply:
    """What a device uploads for a round, and what it knows about it."""

    payload: bytes
    examples: int
    reference_digest: str = ""  # mask rounds: hex SHA-256 of the reference mask drawn
    delta: int = 0  # positions where the own sample differs from the reference
    kept: int = 0  # positions coded in the payload
    encode_s: float = 0.0  # seconds from the trained theta (or weights) to the payload: sample, delta, rank, codec


class LocalLearner:
    """One device's examples (as prefix outputs) and its work in a round."""

    def __init__(self, model: Model, inputs: Inputs, labels) -> None:
        if num_rows(inputs) == 0:
            raise ValueError("a device with no local examples cannot learn")
        self.model, self.inputs, self.labels = model, inputs, torch.as_tensor(labels)

    def work(self, task: DeviceTask, name: str, head: Optional[Head], thresholds: Optional[np.ndarray] = None,
             progress: Optional[Callable[[int], None]] = None, offset: Optional[np.ndarray] = None) -> Reply:
        """The device's reply to `task`: its head share in a head round (`head` is the previous head
        round's result, or None), its encoded mask delta in a mask round (`head` frozen, `thresholds` the
        global theta as received), or its encoded weight update for a fine-tuning baseline's codec
        (`offset`: the global weights less the pretrained ones); in the refit round its head share on the
        final network (the expected mask of `thresholds`, or the weights of `offset`)."""
        if task.phase == HEAD:
            return self.head_share(task, name, head)
        if task.phase == REFIT:
            if thresholds is None and offset is None:
                raise ValueError("a refit round needs the global theta (or the global weights' offset)")
            return self.head_share(task, name, head, thresholds, offset)
        if get_codec(task.codec).carries == WEIGHTS:
            if head is None or offset is None:
                raise ValueError("a weight round needs the head and the global weights' offset")
            return self.weight_update(task, name, head, offset, progress)
        if head is None or thresholds is None:
            raise ValueError("a mask round needs the head and the global theta")
        return self.mask_update(task, name, head, thresholds, progress)

    def head_share(self, task: DeviceTask, name: str, head: Optional[Head], thresholds: Optional[np.ndarray] = None,
                   offset: Optional[np.ndarray] = None) -> Reply:
        """Features of the unmasked backbone (of the expected network theta * w with `thresholds`, of the
        fine-tuned weights with `offset`) -> a linear probe (from the current head), or LDA statistics."""
        m = self.model
        if thresholds is not None:
            m.masks.set_theta(thresholds_to_theta(thresholds))
            m.masks.set_mode(EXPECTED)
        else:
            if offset is not None:
                m.set_offset(offset)
            m.masks.set_mode(FIXED, np.ones(m.d, dtype=bool))
        features = features_of(m.net[0], self.inputs)
        if task.head == LDA:
            covariance = task.lda_covariance
            if covariance == "projected":  # statistics of P'x, P drawn from the head round's seed
                rank = lda_width(m.feature_dim, covariance, task.lda_rank)
                projection = lda_projection(m.feature_dim, rank, task.seed)
                features, covariance = features.double() @ torch.from_numpy(projection), "full"
            stats = lda_statistics(features, self.labels, m.num_classes, covariance)
            if task.local.loss == VIRTUAL_CLASSES and task.phase == HEAD:  # and the class sums of the blocks' inputs
                stats = replace(stats, inputs=class_sums(self.inputs, self.labels, m.num_classes))
            payload = encode_lda_stats(stats, task.lda_covariance)
        else:
            weight, bias = linear_probe(features, self.labels, m.num_classes, task.local.head_epochs,
                                        task.local.head_lr, task.local.batch_size, train_seed(task.seed, name),
                                        init=head)
            payload = encode_head(weight, bias)
        return Reply(payload, len(self.labels))

    def mask_update(self, task: DeviceTask, name: str, head: Head, thresholds: np.ndarray,
                    progress: Optional[Callable[[int], None]] = None) -> Reply:
        """theta_g -> local training (head frozen) -> theta_k -> reference, sample, KL-ranked delta -> codec."""
        m = self.model
        m.set_head(head)
        theta_k = train_mask(m.net, m.masks, thresholds_to_theta(thresholds), self.inputs, self.labels, task.local,
                             train_seed(task.seed, name), progress, head[2] if len(head) > 2 else None)
        started = time.perf_counter()
        upload = client_update(thresholds, theta_k, task.seed, name, task.kappa, get_codec(task.codec),
                               task.reference, task.ranking, task.tau if task.mask_rule == THRESHOLD else None)
        return Reply(upload.payload, len(self.labels), upload.reference_digest, upload.delta, upload.kept,
                     time.perf_counter() - started)

    def weight_update(self, task: DeviceTask, name: str, head: Head, offset: np.ndarray,
                      progress: Optional[Callable[[int], None]] = None) -> Reply:
        """w_g (pretrained + offset) -> local fine-tuning of the same layers (head frozen) -> w_k - w_g -> codec."""
        m = self.model
        m.set_head(head)
        start = m.set_offset(offset)
        trained = train_weights(m.net, m.masks, self.inputs, self.labels, task.local, train_seed(task.seed, name),
                                progress)
        started = time.perf_counter()
        payload = get_codec(task.codec).encode(trained - start, m.d)
        return Reply(payload, len(self.labels), encode_s=time.perf_counter() - started)


class Evaluator:
    """Accuracy on held-out examples: the head alone (every weight kept) after the head phase; after a
    mask round, with a mask sampled from theta (`eval_seed`), with the expected mask theta * w, and with the
    deterministic mask theta >= 1/2."""

    def __init__(self, model: Model, inputs: Inputs, labels) -> None:
        self.model, self.inputs, self.labels = model, inputs, torch.as_tensor(labels)

    def __call__(self, head: Head, thresholds: Optional[np.ndarray] = None, eval_seed: int = 0,
                 tau: Optional[float] = None, offset: Optional[np.ndarray] = None) -> Dict:
        """With `tau`, the scored mask is theta >= tau (FedMask) instead of a sample; with `offset`, the
        fine-tuned weights (pretrained + offset) are scored with every weight kept."""
        m = self.model
        m.set_head(head)
        if offset is not None:
            m.set_offset(offset)
        if thresholds is None:
            kept = evaluate(m.net, m.masks, self.inputs, self.labels, mask=np.ones(m.d, dtype=bool))
            return {"accuracy": kept} if offset is None else {"accuracy": kept, "accuracy_expected": kept}
        theta = thresholds_to_theta(thresholds)
        m.masks.set_theta(theta)
        mask = sample_mask(thresholds, eval_seed) if tau is None else theta >= tau
        sampled = evaluate(m.net, m.masks, self.inputs, self.labels, mask=mask)
        return {"accuracy": sampled, "accuracy_expected": evaluate(m.net, m.masks, self.inputs, self.labels),
                # the deterministic mask theta >= 1/2 (what `deltamask-server export --mask mode` bakes)
                "accuracy_mode": evaluate(m.net, m.masks, self.inputs, self.labels, mask=theta >= 0.5)}


__all__ = ["Evaluator", "LocalLearner", "Model", "Reply"]
