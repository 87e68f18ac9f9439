"""deltamask-predict: classify images with a model `deltamask-server export` wrote (server/export.py says what the
file holds). An .onnx file runs on onnxruntime (no torch needed); any other file is loaded as TorchScript.

    deltamask-predict model.onnx shirt.png boot.jpg [--top 3] [--json]
"""
import json
import sys
from pathlib import Path

import numpy as np

METADATA_KEY = "deltamask"


class Predictor:
    """An exported model, run by onnxruntime (.onnx) or TorchScript (anything else), with its preprocessing."""

    def __init__(self, path: str) -> None:
        self.path = str(path)
        if self.path.endswith(".onnx"):
            import onnxruntime

            self.session = onnxruntime.InferenceSession(self.path, providers=["CPUExecutionProvider"])
            self.meta = json.loads(self.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
        else:
            import torch

            files = {"deltamask.json": ""}
            self.module = torch.jit.load(self.path, _extra_files=files)
            self.session, self.meta = None, json.loads(files["deltamask.json"])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits of preprocessed images (N, C, S, S) float32."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.session is not None:
            return self.session.run(["logits"], {"images": batch})[0]
        import torch

        with torch.no_grad():
            return self.module(torch.from_numpy(batch)).numpy()

    def preprocess(self, image) -> np.ndarray:
        """One PIL image -> (C, S, S) float32, as the model was trained (PIL's bilinear resize, which for a
        downscale averages like torch's antialiased one; not bit-identical to it)."""
        from PIL import Image

        m = self.meta
        size, channels = m["image_size"], m["channels"]
        image = image.convert("L" if channels == 1 or image.mode in ("L", "I;16", "1") else "RGB")
        planes = [image] if image.mode == "L" else list(image.split())
        x = np.stack([np.asarray(p.convert("F").resize((size, size), Image.BILINEAR), np.float32) / 255.0
                      for p in planes])
        if len(x) == 1 and channels == 3:
            x = np.repeat(x, 3, axis=0)
        mean, std = np.asarray(m["mean"], np.float32)[:, None, None], np.asarray(m["std"], np.float32)[:, None, None]
        return (x - mean) / std

    def predict(self, paths, top: int = 3):
        from PIL import Image

        batch = []
        for p in paths:
            with Image.open(p) as image:
                batch.append(self.preprocess(image))
        logits = self.logits(np.stack(batch))
        e = np.exp(logits - logits.max(1, keepdims=True))
        scores = e / e.sum(1, keepdims=True)
        names = self.meta["class_names"]
        for path, row in zip(paths, scores):
            best = np.argsort(-row)[:top]
            yield str(path), [(names[i] if i < len(names) else str(i), float(row[i])) for i in best]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="deltamask-predict",
                                     description="classify images with a model deltamask-server export wrote")
    parser.add_argument("model", help="model.onnx (onnxruntime) or a TorchScript file")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if not Path(args.model).is_file():
            raise OSError(f"no model file {args.model}")
        predictor = Predictor(args.model)
        for path, best in predictor.predict(args.images, args.top):
            if args.json:
                print(json.dumps({"image": path, "classes": [{"class": c, "score": s} for c, s in best]}))
            else:
                print(f"{path}: " + ", ".join(f"{c} {s:.3f}" for c, s in best))
    except (OSError, ValueError, KeyError) as exc:
        print(f"deltamask-predict: error: {exc}", file=sys.stderr)
        return 2
    return 0


def exported_accuracy(predictor: Predictor, inputs: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    """Accuracy of an exported model on preprocessed inputs (N, C, S, S)."""
    correct = 0
    for lo in range(0, len(labels), batch):
        correct += int((predictor.logits(inputs[lo:lo + batch]).argmax(1) == labels[lo:lo + batch]).sum())
    return correct / max(1, len(labels))


__all__ = ["METADATA_KEY", "Predictor", "exported_accuracy", "main"]


if __name__ == "__main__":
    sys.exit(main())
