"""The core imports without torch: everything under deltamask/ but deltamask/learn/ and deltamask/flower.py
(Flower's adapter: it needs flwr and the torch learner), and the coordinator's round machinery. `make test` also runs this file in an environment with no torch at all (.venv-core)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import importlib, pkgutil, sys
import deltamask
names, todo = [], [deltamask]
while todo:  # every module and subpackage, without importing deltamask.learn (walk_packages would)
    package = todo.pop()
    for m in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if m.name not in ("deltamask.learn", "deltamask.flower"):
            names.append(m.name)
            module = importlib.import_module(m.name)
            if m.ispkg:
                todo.append(module)
for name in ["server.config", "server.coordinator", "server.store"]:
    importlib.import_module(name)
assert "torch" not in sys.modules, "torch was imported"
print(len(names))
"""


def test_the_core_and_the_coordinator_round_machinery_import_without_torch():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 20  # sampling, codecs, federation, ... were all imported


def test_the_torch_modules_say_what_is_missing_where_torch_is_not_installed():
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here; .venv-core (make test-core) has none and runs this test")
    out = subprocess.run([sys.executable, "-c", "import deltamask.learn.masking"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode != 0 and "No module named 'torch'" in out.stderr
