"""The experiment files load into compare.py's arguments, and a bad key is named."""
import argparse

import pytest

from tests.scripts import ROOT, load_script


def compare():
    return load_script("compare")


@pytest.mark.parametrize("name", ["iid", "noniid"])
def test_the_experiment_files_name_known_runs_and_the_papers_settings(name):
    args = argparse.Namespace(set=[], out=None, runs=None)
    compare().experiment(ROOT / "experiments" / f"{name}.yaml", args)
    assert args.clients == 30 and args.out.parts[:2] == ("docs", "runs")
    # every method; three seeds for the default, FedPM and the best variant
    assert {"fedmask", "deepreduce", "finetune", "eden", "linear-probe", "fedpm"} <= set(args.runs)
    assert all(len(args.run_seeds[r]) == 3 for r in ("deltamask-exact-cond", "fedpm", "deltamask-cond"))
    assert (args.alpha, args.rho) == ((10, 1.0) if name == "iid" else (0.1, 0.2))


def test_an_unknown_key_is_named_with_its_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 3\nroundz: 4\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown keys \['roundz'\]"):
        compare().experiment(bad, argparse.Namespace(set=[], out=None, runs=None))


def test_the_skew_virtual_experiment_sets_the_measured_setting_for_deltamask_and_fedpm():
    module = compare()
    args = argparse.Namespace(set=[], out=None, runs=None)
    module.experiment(ROOT / "experiments" / "skew-virtual.yaml", args)
    assert args.runs == ["deltamask-exact-cond", "fedpm"] and (args.alpha, args.rho, args.rounds) == (0.1, 0.2, 60)
    assert sorted(args.set) == ["lda_covariance=full", "local.epochs=10", "local.loss=virtual_classes", "theta0=0.99"]
    config = module.sim_config({"rounds": 60, "lda_covariance": "full", "theta0": 0.99}, 0, module.RUNS["fedpm"],
                               {"loss": "virtual_classes", "epochs": 10})
    config.check()
    assert (config.local.loss, config.local.epochs, config.head, config.theta0) == ("virtual_classes", 10, "lda", 0.99)
