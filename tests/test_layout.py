"""The project's shape: the core and the agent stay runnable on Python 3.9 (the torch-free core: test_layering)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_and_edge_client_need_at_most_python_3_9():
    vermin = str(Path(sys.executable).parent / "vermin")
    out = subprocess.run([vermin, "--no-tips", "-t=3.9-", "--eval-annotations", "deltamask", "edge_client"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    minimum = out.stdout.split("Minimum required versions:")[1].split()[0]
    assert tuple(int(x) for x in minimum.split(".")) <= (3, 9)
