import numpy as np
import pytest
import torch
from torch import nn

from deltamask.models import load_backbone
from deltamask.prefix_cache import cache_key, load, run_prefix, save
from deltamask.training import average_heads, evaluate, head_bits, kaiming_head, lda_head, lda_statistics, linear_probe


def gaussian_classes(n=600, dim=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    means = rng.normal(0, 3, (classes, dim))
    x = means[labels] + rng.normal(0, 1, (n, dim))
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(labels)


def accuracy(head, x, y):
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


def test_lda_from_client_shares_equals_lda_on_all_data_and_classifies():
    x, y = gaussian_classes()
    whole = lda_head([lda_statistics(x, y, 3)])
    split = lda_head([lda_statistics(x[:200], y[:200], 3), lda_statistics(x[200:], y[200:], 3)])
    assert torch.allclose(whole.weight, split.weight, atol=1e-4) and torch.allclose(whole.bias, split.bias, atol=1e-4)
    assert accuracy(whole, x, y) > 0.95


def test_linear_probe_learns_and_heads_average_by_weight():
    x, y = gaussian_classes(seed=1)
    a = linear_probe(x[:300], y[:300], 3, epochs=30, lr=0.01)
    b = linear_probe(x[300:], y[300:], 3, epochs=30, lr=0.01, seed=1)
    assert accuracy(a, x, y) > 0.9
    avg = average_heads([a, b], [1, 3])
    assert torch.allclose(avg.weight, 0.25 * a.weight + 0.75 * b.weight)
    assert head_bits(avg) == 32 * (8 * 3 + 3)


def test_kaiming_head_is_reproducible_from_its_seed():
    assert torch.equal(kaiming_head(8, 3, seed=4).weight, kaiming_head(8, 3, seed=4).weight)
    assert not torch.equal(kaiming_head(8, 3, seed=4).weight, kaiming_head(8, 3, seed=5).weight)


def test_prefix_cache_gives_the_backbone_outputs_and_round_trips_on_disk(tmp_path):
    backbone = load_backbone("tiny", weights=None)
    x = torch.randn(70, 1, 28, 28)
    cached = run_prefix(backbone, torch.split(x, 16))
    with torch.no_grad():
        assert torch.allclose(backbone.masked(cached), backbone.features(x), atol=1e-6)
    key = cache_key(backbone, x.numpy())
    assert load(tmp_path, key) is None
    save(cached, tmp_path, key)
    assert torch.equal(load(tmp_path, key), cached)
    assert cache_key(backbone, x.numpy()[:-1]) != key


def test_evaluate_with_a_fixed_all_ones_mask_is_the_unmasked_model():
    from deltamask.masking import MaskedModule
    backbone = load_backbone("tiny", weights=None)
    x, y = torch.randn(50, 1, 28, 28), torch.randint(0, 10, (50,))
    head = nn.Linear(backbone.feature_dim, 10)
    with torch.no_grad():
        plain = float((head(backbone.features(x)).argmax(1) == y).float().mean())
    hidden = run_prefix(backbone, [x])
    masks = MaskedModule(backbone.masked, theta0=0.5)
    assert evaluate(nn.Sequential(backbone.masked, head), masks, hidden, y, mask=np.ones(masks.d, bool)) == \
        pytest.approx(plain)
