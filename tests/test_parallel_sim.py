"""The simulator on Ray: devices trained by 2 Ray actors and their uploads summed as Ray shard tasks give the
rows of the sequential simulator, byte for byte (theta, head and weight digests, accuracies, bits)."""
import json
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray", reason="the Ray simulator needs the ray extra (make install has it)")
torch = pytest.importorskip("torch")

from deltamask.federation import LocalTraining  # noqa: E402
from deltamask.learn.sim import RayFleet, SimConfig, run  # noqa: E402

TINY = dict(backbone="tiny", weights=None, image_size=16, dataset="digits", train_samples=0, test_samples=0,
            clients=4, rho=0.75, rounds=2, min_per_client=5, head="linear_probe", head_rounds=2,
            local=LocalTraining(epochs=1, head_epochs=3, batch_size=32))


def _strip(rows):  # timings differ from run to run; everything else must not
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.parametrize("codec", ["exact", "bfuse8", "float32"])
def test_ray_fleet_gives_the_sequential_rows(local_ray, codec):
    config = SimConfig(codec=codec, **TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each actor uses: the same float sums in the same order
    try:
        sequential = list(run(config, progress=False))
    finally:
        torch.set_num_threads(threads)
    fleet = RayFleet(config, workers=2)
    try:
        parallel = list(run(config, progress=False, fleet=fleet))
    finally:
        fleet.close()
    assert ray.is_initialized()  # the fleet leaves a Ray it did not start running
    assert [r["phase"] for r in sequential] == ["head", "head", "mask", "mask", "refit"]
    assert [r["clients"] for r in sequential[2:]] == [3, 3, 4]  # K = 3 of the 4 devices a mask round, all refit
    digest = "weights_sha256" if codec == "float32" else "theta_sha256"
    assert len({r[digest] for r in sequential[2:4]}) == 2  # the rounds move the federation
    assert _strip(parallel) == _strip(sequential)


def test_cli_runs_on_ray_and_says_when_workers_are_wrong(tmp_path):
    args = ["--backbone", "tiny", "--weights", "none", "--image-size", "16", "--dataset", "digits",
            "--train-samples", "0", "--test-samples", "0", "--clients", "2", "--rounds", "1", "--min-per-client", "5",
            "--epochs", "1"]
    out = subprocess.run([sys.executable, "-m", "deltamask.learn.sim", *args, "--ray-workers", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert "ray_workers" not in rows[0]["config"]  # how it ran is not part of what it computed
    assert [r["round"] for r in rows[1:]] == [0, 1, 2] and rows[2]["clients"] == 2  # head, mask, refit
    bad = subprocess.run([sys.executable, "-m", "deltamask.learn.sim", *args, "--ray-workers", "-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--ray-workers must be 0 or more" in bad.stderr
