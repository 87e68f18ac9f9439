import numpy as np
import pytest
import torch
from torch import nn

from deltamask.learn.models import load_backbone
from deltamask.learn.prefix_cache import cache_key, load, run_prefix, save
from deltamask.federation import LocalTraining, average_heads, lda_head
from deltamask.learn.training import class_sums, evaluate, lda_statistics, linear_probe, train_mask


def gaussian_classes(n=600, dim=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    means = rng.normal(0, 3, (classes, dim))
    x = means[labels] + rng.normal(0, 1, (n, dim))
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(labels)


def accuracy(head, x, y):
    weight, bias = head
    return float(((x.numpy() @ weight.T + bias).argmax(1) == y.numpy()).mean())


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_lda_from_client_shares_equals_lda_on_all_data_and_classifies(covariance):
    """Summed statistics: the head does not depend on how the data are split."""
    x, y = gaussian_classes()
    whole = lda_head([lda_statistics(x, y, 3, covariance)])
    split = lda_head([lda_statistics(x[:200], y[:200], 3, covariance),
                      lda_statistics(x[200:], y[200:], 3, covariance)])
    assert np.allclose(whole[0], split[0], atol=1e-4) and np.allclose(whole[1], split[1], atol=1e-4)
    assert accuracy(whole, x, y) > 0.95


def test_linear_probe_learns_and_heads_average_by_weight():
    x, y = gaussian_classes(seed=1)
    a = linear_probe(x[:300], y[:300], 3, epochs=30, lr=0.01)
    b = linear_probe(x[300:], y[300:], 3, epochs=30, lr=0.01, seed=1)
    assert accuracy(a, x, y) > 0.9
    avg = average_heads([a, b], [1, 3])
    assert np.allclose(avg[0], 0.25 * a[0] + 0.75 * b[0]) and np.allclose(avg[1], 0.25 * a[1] + 0.75 * b[1])
    again = linear_probe(x[:300], y[:300], 3, epochs=1, lr=0.01, init=avg)  # a later head round starts here
    assert not np.array_equal(again[0], avg[0]) and np.abs(again[0] - avg[0]).max() < 0.1


def test_local_classes_loss_leaves_the_absent_classes_logits_alone():
    """With the softmax over the classes a device holds, the mask gets no gradient pushing absent classes
    down: a device holding only class 0 and 1 learns a different mask than with the full softmax."""
    from deltamask.learn.masking import MaskedModule

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    masks = MaskedModule(net, theta0=0.9)
    x, y = gaussian_classes(n=64)
    keep = y < 2
    x, y = x[keep], y[keep]
    full = train_mask(net, masks, np.full(masks.d, 0.9), x, y, LocalTraining(batch_size=16, loss="cross_entropy"),
                      seed=3)
    local = train_mask(net, masks, np.full(masks.d, 0.9), x, y, LocalTraining(batch_size=16, loss="local_classes"),
                       seed=3)
    assert not np.allclose(full, local)
    again = train_mask(net, masks, np.full(masks.d, 0.9), x, y, LocalTraining(batch_size=16, loss="local_classes"),
                       seed=3)
    assert np.array_equal(local, again)


def test_virtual_classes_train_on_twins_of_the_classes_a_device_lacks_and_are_seeded():
    """virtual_classes: a device holding classes 0 and 1 also trains on x - m_y + m_2 labelled 2 (class 3 is
    held by no device: no twins of it). Its mask differs from the plain cross-entropy's, is the same for the
    same seed, and moves with anchor 2."""
    from deltamask.learn.masking import MaskedModule

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    masks = MaskedModule(net, theta0=0.9)
    x, y = gaussian_classes(n=90, classes=3)
    anchors = (torch.as_tensor(class_sums(x, y, 4)) / torch.bincount(y, minlength=4).clamp(min=1)[:, None]).numpy()
    anchors[3] = np.nan
    keep = y < 2
    x, y = x[keep], y[keep]
    local = LocalTraining(batch_size=16, loss="virtual_classes")
    theta0 = np.full(masks.d, 0.9)
    virtual = train_mask(net, masks, theta0, x, y, local, seed=3, anchors=anchors)
    plain = train_mask(net, masks, theta0, x, y, LocalTraining(batch_size=16, loss="cross_entropy"), seed=3)
    assert not np.allclose(virtual, plain)
    assert np.array_equal(virtual, train_mask(net, masks, theta0, x, y, local, seed=3, anchors=anchors))
    moved = anchors.copy()
    moved[2] += 1.0
    assert not np.array_equal(virtual, train_mask(net, masks, theta0, x, y, local, seed=3, anchors=moved))
    with pytest.raises(ValueError, match="class anchors"):
        train_mask(net, masks, theta0, x, y, local, seed=3)
    with pytest.raises(ValueError, match="7 inputs"):
        train_mask(net, masks, theta0, x, y, local, seed=3, anchors=anchors[:, :7])


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
    from deltamask.learn.masking import MaskedModule
    backbone = load_backbone("tiny", weights=None)
    x, y = torch.randn(50, 1, 28, 28), torch.randint(0, 10, (50,))
    head = nn.Linear(backbone.feature_dim, 10)
    with torch.no_grad():
        plain = float((head(backbone.features(x)).argmax(1) == y).float().mean())
    hidden = run_prefix(backbone, [x])
    masks = MaskedModule(backbone.masked, theta0=0.5)
    assert evaluate(nn.Sequential(backbone.masked, head), masks, hidden, y, mask=np.ones(masks.d, bool)) == \
        pytest.approx(plain)
