"""What the coordinator knows of the model (d, layout, feature size), and scoring it on held-out data
with the same evaluator the simulator uses (`deltamask.learn.learner.Evaluator`)."""
import logging
from typing import Dict, Optional

import numpy as np

from deltamask.federation import AUTO, VIRTUAL_CLASSES, Head
from server.config import ServerConfig
from server.coordinator import ModelFacts

log = logging.getLogger(__name__)


def model_facts(config: ServerConfig) -> ModelFacts:
    """d, layout digest and feature size of the configured backbone (built without weights: same layout)."""
    if config.backbone is None:
        return ModelFacts(int(config.d), "", 0)
    from deltamask.learn.learner import Model

    model = Model(config.backbone, None, config.blocks, config.image_size, config.num_classes, config.theta0)
    if config.d is not None and config.d != model.d:
        raise ValueError(f"config says d = {config.d}, but {config.backbone} with {config.blocks} masked blocks "
                         f"has d = {model.d}")
    virtual = config.local.loss in (VIRTUAL_CLASSES, AUTO)  # auto: the coordinator resolves it with input_dim
    return ModelFacts(model.d, model.masks.layout_digest(), model.feature_dim, model.input_dim if virtual else 0)


class Evaluator:
    """Accuracy on held-out data: the head alone after a head round; a sampled and the expected mask after
    a mask round. Torch is needed only here."""

    def __init__(self, config: ServerConfig) -> None:
        from deltamask.data import load_dataset, seeded_subset
        from deltamask.learn import learner

        e = config.evaluation
        model = learner.Model(config.backbone, config.weights, config.blocks, config.image_size, config.num_classes,
                              config.theta0)
        data = load_dataset(e.dataset, "test", e.root)
        held = seeded_subset(len(data.labels), e.samples, e.seed)
        self.score = learner.Evaluator(model, model.prefix(data.images[held]), data.labels[held])
        log.info("evaluation on %d held-out %s images", len(held), e.dataset)

    def __call__(self, head: Head, thresholds: Optional[np.ndarray], eval_seed: int) -> Dict:
        return self.score(head, thresholds, eval_seed)
