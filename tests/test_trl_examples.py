"""The README's "Use it from TRL" examples are the files under examples/, verbatim, and they run
(offline, on their tiny default models)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("trl_dpo.py", "trl_symmpo.py", "trl_mdpo.py", "fused_loss.py")


def readme_block(name: str) -> str:
    """The ```python block right after the README's ``<!-- examples/NAME -->`` marker."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- examples/{re.escape(name)} -->\n```python\n(.*?)```\n", text, re.S)
    assert m, f"README.md has no block for examples/{name}"
    return m.group(1)


@pytest.mark.parametrize("name", EXAMPLES)
def test_readme_shows_the_example_verbatim(name):
    assert readme_block(name) == (ROOT / "examples" / name).read_text()


@pytest.mark.parametrize("name, expect", [("trl_dpo.py", r"\{'loss': 0\.\d+, 'rewards/margins'"),
                                          ("trl_symmpo.py", r"\{'loss': 2\.\d+, 'loss/dpo': 0\.\d+, 'loss/pair'"),
                                          ("trl_mdpo.py", r"\{'loss': 2\.\d+, 'loss/dpo': 0\.\d+, 'loss/copo'"),
                                          ("fused_loss.py", r"Trainer losses: \[0\.\d+, 0\.\d+, 0\.\d+\]")],
                         ids=["trl_dpo", "trl_symmpo", "trl_mdpo", "fused_loss"])
def test_example_runs(tmp_path, name, expect):
    p = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(expect, p.stdout), p.stdout[-2000:]
    if name in ("trl_symmpo.py", "trl_mdpo.py"):  # the last step's loss is below its value at policy == reference
        loss = float(re.search(r"\{'loss': (\d\.\d+)", p.stdout).group(1))
        assert loss < (4 if name == "trl_symmpo.py" else 3) * math.log(2) - 1e-3, loss
    if name == "fused_loss.py":  # the plain loop's DPO loss falls from log 2
        losses = [float(x) for x in re.findall(r"step \d: loss (\d\.\d+)", p.stdout)]
        assert losses[0] == pytest.approx(0.6931, abs=1e-4) and losses[2] < losses[0]
