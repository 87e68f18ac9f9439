"""The frozen prefix on onnxruntime: the same outputs as torch, the ONNX file exported once and kept, the
runtime resolved per backbone (torch where onnxruntime is not measured faster, or not installed)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from deltamask.learn import prefix_cache  # noqa: E402
from deltamask.learn.learner import Model  # noqa: E402
from deltamask.learn.models import load_backbone  # noqa: E402
from deltamask.learn.onnx_prefix import onnx_file, prefix_runner, runtime_for  # noqa: E402


def test_onnxruntime_gives_the_prefix_outputs_of_torch_and_keeps_its_file(tmp_path):
    torch.manual_seed(0)
    backbone = load_backbone("tiny", weights=None, blocks=1, size=16)
    x = torch.randn(40, 1, 16, 16)  # the tiny backbone reads one channel
    run = prefix_runner(backbone, "onnxruntime", tmp_path)
    with torch.no_grad():
        assert torch.allclose(run(x), backbone.prefix(x), atol=1e-5)
    path = onnx_file(backbone, tmp_path)
    stamp = path.stat().st_mtime_ns
    prefix_runner(backbone, "onnxruntime", tmp_path)
    assert path.stat().st_mtime_ns == stamp and len(list(tmp_path.glob("*.onnx"))) == 1


def test_the_runtime_resolves_per_backbone():
    assert runtime_for(load_backbone("tiny", weights=None, blocks=1, size=16), "auto") == "torch"  # not measured
    assert runtime_for(load_backbone("mobilenet_v2", weights=None, blocks=5, size=64), "auto") == "onnxruntime"
    assert runtime_for(load_backbone("mobilenet_v2", weights=None, blocks=5, size=64), "torch") == "torch"
    with pytest.raises(ValueError, match="prefix runtime"):
        runtime_for(load_backbone("tiny", weights=None, blocks=1, size=16), "tensorrt")


def test_the_prefix_cache_keeps_each_runtimes_outputs_apart(tmp_path):
    model = Model("tiny", None, 1, 16, 10)
    images = (np.random.default_rng(0).random((12, 16, 16)) * 255).astype(np.uint8)
    by_torch = model.prefix(images, cache=tmp_path, runtime="torch")
    by_ort = model.prefix(images, cache=tmp_path, runtime="onnxruntime")
    assert torch.allclose(by_torch, by_ort, atol=1e-5)
    assert len([p for p in tmp_path.iterdir() if p.suffix != ".onnx"]) == 2  # one cached output a runtime
    assert prefix_cache.cache_key(model.backbone, images, "16") != prefix_cache.cache_key(model.backbone, images,
                                                                                         "16|onnxruntime")
