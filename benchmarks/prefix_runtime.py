"""The frozen prefix on onnxruntime against torch, side by side in one run: time per image and peak RSS.

    python benchmarks/prefix_runtime.py [--images 256] [--repeats 3] [--threads 1]

Each (backbone, runtime) measurement runs in a fresh process (peak RSS is the process's own: ru_maxrss;
both hold the torch backbone, as the agent does, which trains the masks with it), and the runtimes
alternate within each repeat so that a noisy machine loads both alike. The ONNX file is exported once
beforehand, as the agent keeps it. MobileNetV2 with
its offline ImageNet weights at 64x64 (the embedded default, 5 masked blocks), and CLIP ViT-B/32's
architecture at 224x224 with random weights (the numbers do not depend on the weights). onnxruntime runs
the ONNX graph the agent exports once per backbone (`deltamask.learn.onnx_prefix`). Prints one JSON object:
per backbone, each runtime's median seconds per image and peak RSS, and the ratios onnxruntime / torch.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONES = {"mobilenet_v2": dict(weights="default", blocks=5, size=64),
             "clip_vit_b32": dict(weights=None, blocks=2, size=224)}

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from deltamask.learn.models import load_backbone
from deltamask.learn.onnx_prefix import prefix_runner
name, runtime, images, threads, cache, kw = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], json.loads(sys.argv[6])
torch.set_num_threads(threads)
torch.manual_seed(0)  # the same random weights (CLIP) in every process
backbone = load_backbone(name, weights=kw["weights"], blocks=kw["blocks"], size=kw["size"])
run = prefix_runner(backbone, runtime, cache, threads=threads)
x = torch.randn(images, 3, kw["size"], kw["size"], generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    run(x[:8])  # warm-up
    started = time.perf_counter()
    for batch in torch.split(x, 32):
        out = run(batch)
    seconds = time.perf_counter() - started
print(json.dumps({"s_per_image": seconds / images, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "checksum": float(out.double().abs().mean())}))
"""


def measure(name, runtime, images, threads, cache):
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", CHILD, name, runtime, str(images), str(threads), cache,
                          json.dumps(BACKBONES[name])], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    args = parser.parse_args()
    result = {"images": args.images, "repeats": args.repeats, "threads": args.threads, "backbones": {}}
    with tempfile.TemporaryDirectory() as cache:
        for name in args.backbones:
            measure(name, "onnxruntime", 8, args.threads, cache)  # the one-off export, apart from what is measured
            runs = {"torch": [], "onnxruntime": []}
            for _ in range(args.repeats):
                for runtime in ("torch", "onnxruntime"):
                    runs[runtime].append(measure(name, runtime, args.images, args.threads, cache))
            row = {rt: {"s_per_image": float(sorted(r["s_per_image"] for r in rs)[len(rs) // 2]),
                        "peak_rss_mb": float(max(r["peak_rss_mb"] for r in rs))} for rt, rs in runs.items()}
            row["time_ratio_ort_over_torch"] = row["onnxruntime"]["s_per_image"] / row["torch"]["s_per_image"]
            row["rss_ratio_ort_over_torch"] = row["onnxruntime"]["peak_rss_mb"] / row["torch"]["peak_rss_mb"]
            row["outputs_agree"] = abs(runs["torch"][0]["checksum"] - runs["onnxruntime"][0]["checksum"]) \
                <= 1e-4 * abs(runs["torch"][0]["checksum"])
            result["backbones"][name] = row
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
