"""What the coordinator knows of the model: d, layout and feature size; and scoring theta on held-out data."""
import logging
from typing import Dict, Optional

import numpy as np

from server.config import ServerConfig
from server.coordinator import ModelFacts

log = logging.getLogger(__name__)


def model_facts(config: ServerConfig) -> ModelFacts:
    """d, layout digest and feature size of the configured backbone (built without weights: same layout)."""
    if config.backbone is None:
        return ModelFacts(int(config.d), "", 0)
    from deltamask.masking import MaskedModule
    from deltamask.models import load_backbone

    backbone = load_backbone(config.backbone, weights=None, blocks=config.blocks, size=config.image_size)
    masks = MaskedModule(backbone.masked, config.theta0)
    if config.d is not None and config.d != masks.d:
        raise ValueError(f"config says d = {config.d}, but {config.backbone} with {config.blocks} masked blocks "
                         f"has d = {masks.d}")
    return ModelFacts(masks.d, masks.layout_digest(), backbone.feature_dim)


class Evaluator:
    """Accuracy of the global theta on held-out data: with a sampled mask and with the expected mask."""

    def __init__(self, config: ServerConfig) -> None:
        import torch
        from torch import nn

        from deltamask.data import load_dataset, prepare_images
        from deltamask.masking import MaskedModule
        from deltamask.models import load_backbone
        from deltamask.prefix_cache import run_prefix

        e = config.evaluation
        backbone = load_backbone(config.backbone, weights=config.weights, blocks=config.blocks, size=config.image_size)
        data = load_dataset(e.dataset, "test", e.root)
        n = len(data.labels) if e.samples <= 0 else min(e.samples, len(data.labels))
        index = np.sort(np.random.default_rng(e.seed).permutation(len(data.labels))[:n])
        pre = backbone.preprocessing
        images = prepare_images(data.images[index], config.image_size, pre.channels, pre.mean, pre.std)
        self.inputs = run_prefix(backbone, torch.split(images, 256))
        self.labels = torch.as_tensor(data.labels[index])
        self.masks = MaskedModule(backbone.masked, config.theta0)
        self.head = nn.Linear(backbone.feature_dim, config.num_classes)
        self.net = nn.Sequential(backbone.masked, self.head)
        self.seed = e.seed
        log.info("evaluation on %d held-out %s images", n, e.dataset)

    def __call__(self, thresholds: np.ndarray, head: Optional[bytes]) -> Dict:
        import torch

        from deltamask.headwire import decode_head

        from deltamask.sampling import round_seed, sample_mask, thresholds_to_theta
        from deltamask.training import evaluate

        if head is None:
            return {}
        weight, bias = decode_head(head, self.head.out_features, self.head.in_features)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(weight))
            self.head.bias.copy_(torch.from_numpy(bias))
        self.masks.set_theta(thresholds_to_theta(thresholds))
        sampled = evaluate(self.net, self.masks, self.inputs, self.labels,
                           mask=sample_mask(thresholds, round_seed(self.seed, -1)))
        expected = evaluate(self.net, self.masks, self.inputs, self.labels)
        return {"accuracy": sampled, "accuracy_expected": expected}
