"""deltamask-report on small synthetic run logs: the table's numbers by hand, PNG plots that open, the
Markdown put between its markers."""
import json

import numpy as np
import pytest
from PIL import Image

from deltamask import report

D, CLIENTS = 1000, 4


def write_run(folder, name, seed, accuracies, bpp, head_bpp=0.5):
    rows = [{"config": {"seed": seed, "codec": name}},
            {"round": 0, "phase": "head", "accuracy": 0.5, "uplink_bpp": head_bpp, "clients": CLIENTS, "d": D}]
    rows += [{"round": i + 1, "phase": "mask", "accuracy": a, "uplink_bpp": b, "downlink_bpp": 2 * b,
              "clients": CLIENTS, "decode_s": 0.04, "encode_s": 0.08} for i, (a, b) in enumerate(zip(accuracies, bpp))]
    (folder / f"{name}-seed{seed}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def logs(tmp_path):
    folder = tmp_path / "iid"
    folder.mkdir()
    write_run(folder, "fedpm", 0, [0.80, 0.85, 0.86], [1.0, 1.0, 1.0])
    write_run(folder, "fedpm", 1, [0.80, 0.84, 0.88], [1.0, 1.0, 1.0])
    write_run(folder, "deltamask", 0, [0.82, 0.86, 0.86], [0.1, 0.05, 0.05])
    return folder


def test_the_table_holds_means_spreads_bits_and_volumes(logs):
    rows = {r["method"]: r for r in report.summarise(report.load(logs), "fedpm")}
    fedpm, dm = rows["fedpm"], rows["deltamask"]
    assert fedpm["seeds"] == [0, 1] and dm["seeds"] == [0]
    assert fedpm["accuracy"] == pytest.approx(0.87) and fedpm["spread"] == pytest.approx(np.std([0.86, 0.88], ddof=1))
    assert dm["spread"] is None and dm["uplink_bpp"] == pytest.approx(0.2 / 3)
    assert fedpm["downlink_bpp"] == pytest.approx(2.0)
    # volume: (head 0.5 + 3 rounds x 1.0 bpp) x d x 4 devices / 8 bits, in MB
    assert fedpm["volume_mb"] == pytest.approx(3.5 * D * CLIENTS / 8e6)
    # within 1 point of its own peak: fedpm seed 0 at round 2 (0.85 >= 0.86 - 0.01), seed 1 at round 3
    assert fedpm["rounds_to_peak"] == pytest.approx(2.5)
    assert fedpm["volume_to_peak_mb"] == pytest.approx(np.mean([2.5, 3.5]) * D * CLIENTS / 8e6)
    assert dm["rounds_to_peak"] == 2 and dm["volume_to_peak_mb"] == pytest.approx(0.65 * D * CLIENTS / 8e6)
    assert dm["relative_volume_to_peak"] == pytest.approx(0.65 / 3.0)
    assert dm["decode_s_per_upload"] == pytest.approx(0.01) and dm["encode_s_per_upload"] == pytest.approx(0.02)
    assert dm["head_bpp"] == pytest.approx(0.5)


def test_linear_probing_alone_is_scored_over_its_head_rounds(logs):
    rows = [{"config": {"seed": 0}}] + [{"round": i, "phase": "head", "accuracy": a, "uplink_bpp": 0.2,
                                         "downlink_bpp": 0.2 if i else 0.0, "clients": CLIENTS, "d": D}
                                        for i, a in enumerate([0.4, 0.6, 0.61])]
    (logs / "linear-probe.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lp = {r["method"]: r for r in report.summarise(report.load(logs), "fedpm")}["linear-probe"]
    assert lp["accuracy"] == pytest.approx(0.61) and lp["rounds"] == 3 and lp["rounds_to_peak"] == 2
    assert lp["head_bpp"] == pytest.approx(0.6) and lp["volume_mb"] == pytest.approx(0.6 * D * CLIENTS / 8e6)


def test_many_methods_split_the_per_round_plots(tmp_path):
    folder = tmp_path / "noniid"
    folder.mkdir()
    names = ["fedpm", "fedmask", "deepreduce", "eden", "finetune", "deltamask-exact-cond"] + \
        [f"kappa-0.{i}" for i in range(2, 10)]
    for n, name in enumerate(names):
        write_run(folder, name, 0, [0.5 + 0.01 * n, 0.6, 0.7], [0.1 * (n + 1)] * 3)
    rows = report.summarise(report.load(folder), "fedpm")
    paths = report.plot("noniid", report.load(folder), rows, tmp_path / "plots", "fedpm")
    assert sorted(p.name for p in paths) == sorted(f"noniid-{w}.png" for w in (
        "accuracy", "accuracy-variants", "uplink", "uplink-variants", "accuracy-vs-bpp", "volume-to-peak",
        "codec-time"))
    for p in paths:
        with Image.open(p) as image:
            assert image.format == "PNG" and image.size[1] > 300


def test_plots_are_pngs_that_open_and_the_report_goes_between_its_markers(logs, tmp_path):
    results = tmp_path / "docs" / "results.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nkept above\n\n<!-- report:begin -->\nold\n<!-- report:end -->\n\nkept below\n")
    assert report.main([str(logs), "--plots", str(tmp_path / "docs" / "plots"), "--into", str(results)]) == 0
    text = results.read_text()
    assert "kept above" in text and "kept below" in text and "old" not in text
    assert "| deltamask [1] | 0.8600 |" in text and "| fedpm [2] | 0.8700 +- 0.0141 |" in text
    pngs = sorted((tmp_path / "docs" / "plots").glob("*.png"))
    assert len(pngs) == 5 and all(f"](plots/{p.name})" in text for p in pngs)
    for p in pngs:
        with Image.open(p) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_a_folder_without_run_logs_is_a_clear_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no run logs" in capsys.readouterr().err
