"""The crash campaign, short: a real coordinator process SIGKILLed at random moments and inside its writes,
files damaged while it is down, and what it kept checked from disk alone (benchmarks/crash.py has the
invariants; `python benchmarks/crash.py --runs 100` is the full campaign, its figures in docs/reliability.md)."""
from tests.scripts import load_script


def test_ten_runs_of_kills_and_damaged_files_break_no_invariant(tmp_path):
    crash = load_script("crash")
    summary = crash.campaign(10, seed=11, folder=tmp_path, jobs=2)
    assert summary["violations"] == []
    assert summary["kills"] >= 15 and summary["acknowledged_uploads"] > 100
    assert any(kind.startswith("killed at") for kind in summary["by_kind"])  # inside a write, not only between
