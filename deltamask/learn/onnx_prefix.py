"""The frozen prefix on onnxruntime: exported to ONNX once per backbone, kept beside the prefix cache, run in
batches. torch stays the fallback (no onnxruntime, a text backbone, an export that fails) and does the
masked training; this is only the prefix pass over the local data.

    run = prefix_runner(backbone, "auto", cache_dir)     # batch tensor -> prefix output tensor

`auto` takes onnxruntime for the backbones where it was measured faster than torch on this kind of CPU
(ONNXRUNTIME_WINS; docs/results.md, `benchmarks/prefix_runtime.py`), torch for the others. The ONNX file's
name carries the backbone, its weights, the split, the input size and the torch version that exported it.
"""
import functools
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from deltamask.errors import ModelError
from deltamask.learn.models.base import Backbone

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "onnxruntime", "torch")
# measured faster (docs/results.md, "The prefix on onnxruntime"): 0.31x torch's time per image for MobileNetV2,
# 0.51x for CLIP ViT-B/32 (whose peak RSS is 1.25x: a second copy of the prefix weights); the others: torch
ONNXRUNTIME_WINS = frozenset({"mobilenet_v2", "clip_vit_b32"})


def runtime_for(backbone: Backbone, runtime: str = "auto") -> str:
    """The runtime `runtime` resolves to for this backbone here ("torch" or "onnxruntime")."""
    if runtime not in RUNTIMES:
        raise ValueError(f"prefix runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch" or backbone.preprocessing.kind != "image":
        return "torch"
    if runtime == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ModelError("prefix runtime onnxruntime asked for, but onnxruntime is not installed "
                             "(pip install onnxruntime)") from None
        return "onnxruntime"
    return "onnxruntime" if backbone.name in ONNXRUNTIME_WINS and onnxruntime_loads() else "torch"


@functools.lru_cache(maxsize=1)
def onnxruntime_loads() -> bool:
    """Whether onnxruntime imports here, tried once in a child process: where its native library cannot load
    (seen: onnxruntime 1.32 under qemu-aarch64 7.2, a segmentation fault on import), `auto` keeps torch
    instead of the agent dying with it."""
    if importlib.util.find_spec("onnxruntime") is None:
        return False  # not installed: torch, quietly
    try:
        probe = subprocess.run([sys.executable, "-c", "import onnxruntime"], capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if probe.returncode != 0:
        log.warning("onnxruntime does not load here (exit %d): the prefix runs on torch", probe.returncode)
    return probe.returncode == 0


def prefix_runner(backbone: Backbone, runtime: str = "auto", cache: Optional[Path] = None,
                  threads: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function batch -> prefix(batch) on the runtime `runtime` resolves to (see `runtime_for`)."""
    backbone.prefix.eval()
    if runtime_for(backbone, runtime) == "torch":
        return backbone.prefix
    import onnxruntime

    folder = Path(cache) if cache else Path.home() / ".cache" / "deltamask" / "prefix"
    try:
        path = onnx_file(backbone, folder)
    except Exception as exc:  # torch's exporter needs the onnx package, and may fail on a model: torch runs it
        if runtime == "onnxruntime":
            raise ModelError(f"cannot export the prefix of {backbone.name} to ONNX: {exc}") from exc
        log.warning("prefix of %s not exported to ONNX (%s): it runs on torch", backbone.name, exc)
        return backbone.prefix
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": batch.detach().numpy()})[0])

    return run


def onnx_file(backbone: Backbone, folder: Path) -> Path:
    """The backbone's prefix as ONNX in `folder`, exported the first time (written whole, then renamed)."""
    pre = backbone.preprocessing
    key = hashlib.sha256(f"{backbone.name}|{backbone.weights}|{backbone.blocks}|{pre.size}|{pre.channels}|"
                         f"{torch.__version__}".encode()).hexdigest()[:16]
    path = folder / f"prefix-{backbone.name}-{key}.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.part")
    example = torch.zeros(1, pre.channels, pre.size, pre.size)
    kw = dict(input_names=["images"], output_names=["hidden"], dynamic_axes={"images": {0: "n"}, "hidden": {0: "n"}},
              opset_version=17)
    with torch.no_grad():
        try:
            torch.onnx.export(backbone.prefix, (example,), str(partial), dynamo=False, **kw)
        except TypeError:  # torch < 2.5 has only the TorchScript exporter, and no `dynamo` argument
            torch.onnx.export(backbone.prefix, (example,), str(partial), **kw)
    os.replace(partial, path)
    log.info("prefix of %s exported to %s", backbone.name, path)
    return path


__all__ = ["ONNXRUNTIME_WINS", "RUNTIMES", "onnx_file", "prefix_runner", "runtime_for"]
