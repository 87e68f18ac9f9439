import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltamask.learn.masking import EXPECTED, FEDPM, FIXED, IDENTITY, MaskedModule
from deltamask.federation import LocalTraining
from deltamask.learn.training import train_mask

ROOT = Path(__file__).resolve().parents[1]


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_masked_layers_compute_mask_times_weight():
    net = small_net()
    reference = small_net()
    masks = MaskedModule(net, theta0=0.5)
    mask = np.random.default_rng(0).random(masks.d) < 0.5
    masks.set_mode(FIXED, mask)
    x = torch.randn(2, 3, 6, 6)
    parts = np.split(mask, np.cumsum([int(np.prod(s)) for _, s in masks.layout()])[:-1])
    with torch.no_grad():
        for layer, part in zip([reference[0], reference[5], reference[7]], parts):
            layer.weight.mul_(torch.as_tensor(part.reshape(layer.weight.shape), dtype=torch.float32))
        reference.eval()
        net.eval()
        assert torch.allclose(net(x), reference(x), atol=1e-6)


def test_expected_mode_uses_theta_times_weight():
    lin = nn.Sequential(nn.Linear(4, 2, bias=False))
    w = lin[0].weight.detach().clone()
    masks = MaskedModule(lin, theta0=0.25)
    masks.set_mode(EXPECTED)
    x = torch.randn(3, 4)
    assert torch.allclose(lin(x), F.linear(x, w * 0.25), atol=1e-6)


def test_gradients_reach_only_the_scores():
    net = small_net()
    masks = MaskedModule(net)
    net(torch.randn(2, 3, 6, 6)).sum().backward()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.scores" for name, _ in masks.layout()}
    assert all(p.grad is None for n, p in net.named_parameters() if not n.endswith("scores"))
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in masks.scores())


def test_frozen_weights_and_batchnorm_statistics_are_bitwise_unchanged_by_training():
    net = small_net()
    masks = MaskedModule(net, theta0=0.9)
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("scores")}
    x, y = torch.randn(40, 3, 6, 6), torch.randint(0, 3, (40,))
    theta_k = train_mask(net, masks, np.full(masks.d, 0.9), x, y, LocalTraining(epochs=2, batch_size=8))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not np.allclose(theta_k, 0.9)  # the scores did move


def test_flat_theta_round_trips_and_never_makes_infinite_scores():
    masks = MaskedModule(small_net())
    theta = np.random.default_rng(1).random(masks.d).astype(np.float32)
    theta[:3] = [0.0, 1.0, 0.5]
    masks.set_theta(theta)
    assert all(torch.isfinite(s).all() for s in masks.scores())
    back = masks.theta()
    assert np.allclose(back[3:], theta[3:], atol=1e-6)
    assert 0 < back[0] < 1e-5 and 1 - 1e-5 < back[1] < 1
    with pytest.raises(ValueError, match="d = "):
        masks.set_theta(np.zeros(masks.d + 1))


def test_fedpm_estimator_scales_the_identity_gradient_by_theta():
    grads = {}
    for estimator in (IDENTITY, FEDPM):
        lin = nn.Sequential(nn.Linear(6, 3))
        torch.manual_seed(0)
        nn.init.normal_(lin[0].weight)
        masks = MaskedModule(lin, theta0=0.3, estimator=estimator, seed=7)
        theta = np.linspace(0.1, 0.9, masks.d)
        masks.set_theta(theta)
        lin(torch.ones(1, 6)).sum().backward()
        grads[estimator] = masks.scores()[0].grad.reshape(-1).numpy()
    theta = np.linspace(0.1, 0.9, 18).astype(np.float32)
    assert np.allclose(grads[FEDPM], grads[IDENTITY] * theta, atol=1e-6)



@pytest.mark.parametrize("estimator", [IDENTITY, FEDPM])
def test_sampled_mask_is_a_seeded_bernoulli_draw_with_the_straight_through_gradient(estimator):
    lin = nn.Sequential(nn.Conv2d(2, 3, 2))
    w, b = lin[0].weight.detach().clone(), lin[0].bias.detach().clone()
    masks = MaskedModule(lin, estimator=estimator, seed=5)
    masks.set_theta(np.linspace(0.05, 0.95, masks.d))
    theta = torch.sigmoid(masks.scores()[0].detach())
    m = torch.bernoulli(theta, generator=torch.Generator().manual_seed(5))  # the layer's generator, same seed
    x = torch.randn(4, 2, 5, 5)
    out = lin(x)
    weight = (w * m).requires_grad_()
    reference = F.conv2d(x, weight, b)
    assert torch.equal(out, reference)
    grad = torch.randn_like(out)
    out.backward(grad)
    reference.backward(grad)
    expected = weight.grad * w * theta * (1 - theta) * (theta if estimator == FEDPM else 1)
    assert torch.allclose(masks.scores()[0].grad, expected, atol=1e-6)

LAYOUT_SCRIPT = """
import torch
from torch import nn
from deltamask.learn.masking import MaskedModule
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)))
print(MaskedModule(net).layout_digest())
"""
GOLDEN_LAYOUT = [("0", (4, 3, 3, 3)), ("2.0", (5, 4)), ("2.1", (3, 5))]


def test_canonical_order_is_stable_across_processes():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)))
    masks = MaskedModule(net)
    assert masks.layout() == GOLDEN_LAYOUT
    runs = {subprocess.run([sys.executable, "-c", LAYOUT_SCRIPT], capture_output=True, text=True,
                           cwd=ROOT, check=True).stdout.strip() for _ in range(2)}
    assert runs == {masks.layout_digest()}


def test_settings_are_validated():
    with pytest.raises(ValueError, match="estimator"):
        MaskedModule(small_net(), estimator="gumbel")
    with pytest.raises(ValueError, match="theta0"):
        MaskedModule(small_net(), theta0=1.5)
    with pytest.raises(ValueError, match="no Linear"):
        MaskedModule(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no local data"):
        masks = MaskedModule(nn.Sequential(nn.Linear(2, 2)))
        train_mask(masks.module, masks, np.full(masks.d, 0.5), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
