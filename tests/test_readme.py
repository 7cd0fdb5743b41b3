"""The README's Python example runs as written (a user's nn.Module → GHN-Q weights → a .qm the exporters take)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from calibration.qmodel import load

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python: any nn.Module\n\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its Python example"
    r = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    qm = load(tmp_path / "model.qm")
    assert [op.kind for op in qm.ops][-2:] == ["reshape", "fully_connected"]
    assert qm.tensors[qm.input].shape == [1, 32, 32, 3]
