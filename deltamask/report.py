"""deltamask-report: run logs (JSON lines, one file a run) into the paper's tables and PNG plots.

    deltamask-report docs/runs/iid docs/runs/noniid --plots docs/plots [--into docs/results.md] [--reference fedpm]
    deltamask-report docs/runs/iid docs/runs/iid-cond --merge iid --plots docs/plots   # two folders, one setting

A run log is what `benchmarks/compare.py` (and `deltamask-sim`) write: a {"config": ...} line, then one line a
round ({"round", "phase", "accuracy", "uplink_bpp", "downlink_bpp", "clients", "decode_s", ...}). A folder is
one setting; in it, files named METHOD.jsonl or METHOD-seedN.jsonl are the runs of a method (the seed is read
from the config). Per setting, one table in the shape of the paper's Tables 2-3: final accuracy (the sampled
mask of the last round; mean +- sample standard deviation over seeds), average uplink and downlink bits per
parameter over the mask rounds, the total data volume all devices uploaded (head phase included), the
rounds and the volume to come within 1 point of the run's own peak accuracy, and that volume relative to
`--reference`'s. Plots (matplotlib, Agg): accuracy and uplink bpp per round (mean over seeds, the band their
range), accuracy against uplink bpp (Figure 1's view), relative data volume to 1 point of peak (Figure 7a),
encode and decode seconds per upload (Figure 7b). With --into, the Markdown goes between
`<!-- report:begin -->` and `<!-- report:end -->` in that file (added at its end when absent); otherwise
it is printed.
"""
import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
SEED_SUFFIX = re.compile(r"-seed\d+$")
WITHIN = 0.01  # "near peak": within 1 point of accuracy
MAX_CURVES = 12  # per-round plots with more methods are split: baselines, and DeltaMask's variants
VARIANTS = ("deltamask", "kappa-", "random-kappa", "shared")


@dataclass
class Run:
    method: str
    seed: int
    config: Dict
    rows: List[Dict] = field(default_factory=list)

    @property
    def masks(self) -> List[Dict]:
        """The rounds a method is scored over: its mask (or weight) rounds; linear probing alone has only
        head rounds, which are then its rounds."""
        rounds = [r for r in self.rows if r.get("phase") == "mask"]
        return rounds or [r for r in self.rows if r.get("phase") == "head" and "accuracy" in r]

    @property
    def d(self) -> int:
        found = [r["d"] for r in self.rows if "d" in r]
        if not found:
            raise ValueError(f"run {self.method} (seed {self.seed}) names no d in its rows")
        return int(found[0])

    def upload_mb(self) -> np.ndarray:
        """Megabytes (10^6 bytes) all devices uploaded, cumulated round by round (head rounds first)."""
        per_round = [r["uplink_bpp"] * self.d * r.get("clients", 1) / 8e6 for r in self.rows if "uplink_bpp" in r]
        return np.cumsum(per_round)


def load(folder: Path) -> List[Run]:
    """Every METHOD[-seedN].jsonl in `folder`; ValueError naming the file for a log that is not one."""
    runs = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not lines or "config" not in lines[0]:
            raise ValueError(f"{path}: a run log starts with a {{\"config\": ...}} line")
        config = lines[0]["config"]
        run = Run(SEED_SUFFIX.sub("", path.stem), int(config.get("seed", 0)), config, lines[1:])
        if not run.masks:
            raise ValueError(f"{path}: no rounds")
        runs.append(run)
    if not runs:
        raise ValueError(f"{folder}: no run logs (*.jsonl)")
    return runs


def _near_peak(run: Run):
    """(rounds, megabytes) until the run's accuracy first comes within WITHIN of its own peak."""
    acc = np.array([r["accuracy"] for r in run.masks])
    first = int(np.argmax(acc >= acc.max() - WITHIN))
    heads = len(run.rows) - len(run.masks)
    return first + 1, float(run.upload_mb()[heads + first])


def summarise(runs: Sequence[Run], reference: Optional[str] = None) -> List[Dict]:
    """One row per method: accuracy mean and spread over seeds, bits, volumes (see the module's docstring)."""
    methods: Dict[str, List[Run]] = {}
    for run in runs:
        methods.setdefault(run.method, []).append(run)
    rows = []
    for method, group in methods.items():
        final = np.array([g.masks[-1]["accuracy"] for g in group])
        near = [_near_peak(g) for g in group]
        rows.append({
            "method": method, "seeds": sorted(g.seed for g in group), "rounds": len(group[0].masks),
            "accuracy": float(final.mean()), "spread": float(final.std(ddof=1)) if len(final) > 1 else None,
            "uplink_bpp": float(np.mean([np.mean([r["uplink_bpp"] for r in g.masks]) for g in group])),
            "downlink_bpp": float(np.mean([np.mean([r["downlink_bpp"] for r in g.masks]) for g in group])),
            "volume_mb": float(np.mean([g.upload_mb()[-1] for g in group])),
            "rounds_to_peak": float(np.mean([n for n, _ in near])),
            "volume_to_peak_mb": float(np.mean([mb for _, mb in near])),
            "head_bpp": float(np.mean([sum(r["uplink_bpp"] for r in g.rows if r.get("phase") == "head") for g in group])),
            **{f"{key}_per_upload": float(np.mean([np.mean([r.get(key, 0.0) / max(r.get("clients", 1), 1)
                                                          for r in g.masks]) for g in group]))
               for key in ("encode_s", "decode_s")},
        })
    base = next((r for r in rows if r["method"] == reference), None) or max(rows, key=lambda r: r["volume_to_peak_mb"])
    for r in rows:
        r["relative_volume_to_peak"] = r["volume_to_peak_mb"] / base["volume_to_peak_mb"] \
            if base["volume_to_peak_mb"] else None
    return rows


def table(name: str, rows: List[Dict], reference: str) -> str:
    lines = [f"**{name}** (seeds per method in brackets; +- is the sample standard deviation over seeds)", "",
             "| method | final accuracy | uplink bpp | downlink bpp | head rounds' bpp | data volume (MB) | "
             f"rounds to 1 pt of peak | volume to 1 pt of peak (MB) | relative to {reference} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" +- {r['spread']:.4f}" if r["spread"] is not None else ""
        relative = f"{r['relative_volume_to_peak']:.3f}" if r["relative_volume_to_peak"] is not None else "-"
        lines.append(f"| {r['method']} [{len(r['seeds'])}] | {r['accuracy']:.4f}{spread} | {r['uplink_bpp']:.4f} | "
                     f"{r['downlink_bpp']:.4f} | {r['head_bpp']:.3f} | {r['volume_mb']:.4g} | {r['rounds_to_peak']:.1f} | "
                     f"{r['volume_to_peak_mb']:.4g} | {relative} |")
    return "\n".join(lines)


def plot(name: str, runs: Sequence[Run], rows: List[Dict], folder: Path, reference: str,
         highlight: str = "deltamask-exact-cond") -> List[Path]:
    """The PNG plots of one setting, in `folder`; returns their paths. With more than MAX_CURVES methods the
    per-round plots come twice: the baselines with `highlight`, and DeltaMask's variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    methods = [r["method"] for r in rows]
    paths = []

    def save(fig, what: str) -> None:
        fig.tight_layout()
        path = folder / f"{slug}-{what}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")  # legends placed outside the axes are kept
        plt.close(fig)
        paths.append(path)

    groups = [("", methods)]
    if len(methods) > MAX_CURVES:  # one plot of the baselines (and `highlight`), one of DeltaMask's variants
        variants = [m for m in methods if m.startswith(VARIANTS) and m != highlight]
        groups = [("", [m for m in methods if m not in variants]), ("-variants", variants)]
    styles = [dict(color=c, linestyle=ls) for ls in ("-", "--", ":") for c in plt.get_cmap("tab10").colors]
    for key, label, what, log in (("accuracy", "test accuracy", "accuracy", False),
                                  ("uplink_bpp", "uplink bits per parameter", "uplink", True)):
        for suffix, group in groups:
            fig, ax = plt.subplots(figsize=(7.6, 4.4))
            for method, style in zip(group, styles):
                curves = np.array([[r[key] for r in run.masks] for run in runs if run.method == method])
                x = [r["round"] for r in next(run for run in runs if run.method == method).masks]
                (line,) = ax.plot(x, curves.mean(0), label=method, **style)
                if len(curves) > 1:
                    ax.fill_between(x, curves.min(0), curves.max(0), alpha=0.15, color=line.get_color())
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("round")
            ax.set_ylabel(label)
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{name}: {label} per round{' (DeltaMask variants)' if suffix else ''}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            save(fig, what + suffix)

    fig, ax = plt.subplots(figsize=(7.6, 4.8))
    for r, style in zip(rows, styles * 3):
        ax.errorbar(r["uplink_bpp"], r["accuracy"], yerr=r["spread"] or 0, fmt="o", capsize=3, color=style["color"])
        ax.annotate(r["method"], (r["uplink_bpp"], r["accuracy"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("average uplink bits per parameter (log)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"{name}: accuracy against uplink bits")
    ax.grid(alpha=0.3)
    save(fig, "accuracy-vs-bpp")

    height = 1.2 + 0.28 * len(methods)
    fig, ax = plt.subplots(figsize=(6.4, height))
    ax.barh(methods, [r["relative_volume_to_peak"] or 0 for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel(f"uplink data volume to 1 point of peak accuracy, relative to {reference} (log)")
    ax.set_title(f"{name}: data volume to near-peak accuracy")
    ax.invert_yaxis()
    save(fig, "volume-to-peak")

    fig, ax = plt.subplots(figsize=(6.4, height))
    y = np.arange(len(methods))
    ax.barh(y - 0.2, [r["encode_s_per_upload"] * 1000 for r in rows], height=0.4, label="encode (device)")
    ax.barh(y + 0.2, [r["decode_s_per_upload"] * 1000 for r in rows], height=0.4, label="decode + rebuild (server)")
    ax.set_yticks(y, methods)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("milliseconds per upload (symlog)")
    ax.set_title(f"{name}: encode and decode time per upload")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
    save(fig, "codec-time")
    return paths


def into(path: Path, text: str) -> None:
    """Put `text` between the report markers of `path` (appended, with the markers, when they are absent)."""
    old = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
    path.write_text(new)


def report(folders: Sequence[Path], plots: Optional[Path], reference: str, link_root: Optional[Path] = None,
           merge: Optional[str] = None) -> str:
    """Markdown for each folder (a setting), or for all of them as one setting named `merge`."""
    parts = []
    settings = [(merge, [r for f in folders for r in load(f)])] if merge else [(Path(f).name, load(f)) for f in folders]
    for name, runs in settings:
        rows = summarise(runs, reference)
        parts.append(table(name, rows, reference))
        if plots is not None:
            images = plot(name, runs, rows, plots, reference)
            root = (link_root or Path(".")).resolve()
            parts.append(" ".join(f"![{p.stem}]({os.path.relpath(p.resolve(), root)})" for p in images))
    return "\n\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="deltamask-report", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="one folder of run logs per setting")
    parser.add_argument("--plots", type=Path, default=None, help="write the PNG plots here")
    parser.add_argument("--into", type=Path, default=None, help="Markdown file to put the report in (between markers)")
    parser.add_argument("--reference", default="fedpm", help="method the data volumes are relative to")
    parser.add_argument("--merge", default=None, metavar="NAME", help="the folders' runs as one setting NAME")
    args = parser.parse_args(argv)
    try:
        text = report(args.folders, args.plots, args.reference,
                      args.into.parent.resolve() if args.into else None, args.merge)
    except (ValueError, OSError) as exc:
        print(f"deltamask-report: error: {exc}", file=sys.stderr)
        return 2
    if args.into:
        into(args.into, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
