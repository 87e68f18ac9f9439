"""The README's example runs as written (docs that match the code)."""
import re
from pathlib import Path


def test_readme_round_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert 0 < 8 * len(scope["upload"].payload) / scope["d"] < 1
    assert scope["counts"].masks == 1 and 0.9 < scope["theta_g"].mean() <= 1
