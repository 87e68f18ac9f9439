"""DeltaMask inside Flower: the Strategy and ClientApp of deltamask.flower on Flower's simulation engine (Ray
backend, 3 virtual nodes) give the rows of the project's own simulator for the same config, round by round:
the same head, the same theta wire bytes, the same accuracy and bits. flwr lives in its own environment
(`make test-flower`); elsewhere this file skips."""
import json
import warnings

import pytest

flwr = pytest.importorskip("flwr", reason="Flower runs in .venv-flower (make test-flower)")
torch = pytest.importorskip("torch")

from flwr.simulation import run_simulation  # noqa: E402

from deltamask.federation import DeviceTask, LocalTraining  # noqa: E402
from deltamask.flower import apps, sim_config, task_from_text, task_text  # noqa: E402
from deltamask.learn.sim import SimConfig, run  # noqa: E402

TINY = dict(backbone="tiny", weights=None, image_size=16, dataset="digits", train_samples=0, test_samples=0,
            clients=3, rho=0.67, rounds=3, min_per_client=5, local=LocalTraining(epochs=1, head_epochs=3, batch_size=32))


def _strip(rows):  # timings differ from run to run; everything else must not
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def _sequential(config):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each ClientApp uses (torch-threads = 1)
    try:
        return list(run(config, progress=False))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("extra", [dict(codec="exact-cond", head="linear_probe", head_rounds=2),
                                   dict(codec="bfuse8", head="lda", lda_covariance="diag")])
def test_flower_simulation_gives_the_simulators_rounds(tmp_path, extra):
    config = SimConfig(**TINY, **extra)
    path = tmp_path / "flower.jsonl"
    server, client = apps(config, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server, client, num_supernodes=config.clients,
                       backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["config"]["codec"] == config.codec
    flower, own = lines[1:], _sequential(config)
    assert [r["phase"] for r in own] == ["head"] * config.head_phase_rounds + ["mask"] * 3 + ["refit"]
    assert len({r["theta_sha256"] for r in own if r["phase"] == "mask"}) == 3  # theta moves every round
    assert [r["clients"] for r in own if r["phase"] == "mask"] == [2, 2, 2]  # K = 2 of 3 a round
    assert _strip(flower) == _strip(own)


def test_the_run_config_and_the_task_travel_exactly():
    config = sim_config({"backbone": "tiny", "weights": "none", "clients": 5, "alpha": 1, "local-epochs": 2,
                         "local.lr": 0.05, "codec": "exact-cond", "log": "x.jsonl", "torch-threads": 1})
    assert config.weights is None and config.alpha == 1.0 and isinstance(config.alpha, float)
    assert config.local.epochs == 2 and config.local.lr == 0.05 and config.codec == "exact-cond"
    with pytest.raises(ValueError, match="unknown run-config keys: clientz"):
        sim_config({"clientz": 3})
    with pytest.raises(ValueError, match="codec"):
        sim_config({"codec": "nope"})
    task = DeviceTask("mask", 7, 2 ** 64 - 5, 0.8125, "exact-cond", local=LocalTraining(lr=0.1 + 0.2))
    assert task_from_text(task_text(task)) == task  # a 64-bit seed and every float, exactly
