"""The cheaper masked step behind the prefix-cache speed-up keeps the model's function: timm's QuickGELU
forward bit for bit, and a class-token-only last ViT block that matches the full block in training."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports timm

import pytest  # noqa: E402
import torch  # noqa: E402
from timm.layers.activations import QuickGELU as TimmQuickGELU  # noqa: E402

from deltamask.learn.masking import MaskedModule  # noqa: E402
from deltamask.learn.models import load_backbone  # noqa: E402
from deltamask.learn.models.timm_models import QuickGELU  # noqa: E402


def test_quick_gelu_has_timm_forward_bits_and_the_right_gradient():
    x = (torch.randn(4, 7, 33) * 4).requires_grad_()
    grad = torch.randn_like(x)
    ours, timm_out = QuickGELU()(x), TimmQuickGELU()(x)
    assert torch.equal(ours, timm_out)
    assert torch.allclose(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(timm_out, x, grad)[0],
                          atol=1e-6)
    assert torch.autograd.gradcheck(QuickGELU(), (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("name, size", [("clip_vit_b32", 64), ("dinov2_s14", 28)])
def test_class_token_tail_trains_like_the_full_tail(name, size):
    torch.manual_seed(0)
    backbone = load_backbone(name, weights=None, blocks=2, size=size)
    parts = (backbone.prefix, backbone.masked)
    assert not any(type(m) is TimmQuickGELU for part in parts for m in part.modules())  # swapped for ours
    with torch.no_grad():  # off the init (DINOv2's LayerScale starts near 0)
        for p in backbone.masked.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        hidden = backbone.prefix(torch.randn(3, 3, size, size))
    masks = MaskedModule(backbone.masked, theta0=0.8)
    assert backbone.masked.token_only
    results = []
    for token_only in (True, False):
        backbone.masked.token_only = token_only
        masks.generator.manual_seed(1)
        out = backbone.masked(hidden)
        out.square().sum().backward()
        results.append((out.detach(), [s.grad.clone() for s in masks.scores()]))
        for s in masks.scores():
            s.grad = None
    (fast, fast_grads), (full, full_grads) = results
    assert torch.allclose(fast, full, atol=1e-5)
    assert all(b.abs().max() > 0 and torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(fast_grads, full_grads))


def test_two_writers_of_the_same_outputs_do_not_trip_on_each_other(tmp_path):
    """Two simulations computing the same prefix outputs at once: each writes its own temporary file, so the
    second rename does not find the first's temporary file gone (seen: FileNotFoundError in a compare run)."""
    import threading

    import torch

    from deltamask.learn import prefix_cache

    outputs = torch.arange(12.0).reshape(3, 4)
    errors = []

    def write():
        try:
            for _ in range(20):
                prefix_cache.save(outputs, tmp_path, "same-key")
        except Exception as exc:  # noqa: BLE001 - the test reports whatever a writer raised
            errors.append(exc)

    writers = [threading.Thread(target=write) for _ in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert errors == [] and torch.equal(prefix_cache.load(tmp_path, "same-key"), outputs)
    assert [p.name for p in tmp_path.iterdir()] == ["same-key.pt"]
