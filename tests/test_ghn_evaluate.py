"""`python -m ghnq.evaluate`: one JSON line per spec, shards split the list, --resume keeps finished lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ghnq.evaluate import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--bits", "float,8,4a4", "--images", "64", "--bn-images", "32", "--engine", "fakequant", "--threads", "1"]


def test_json_lines_shards_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    specs = [str(ROOT / "specs/sepnet.yaml"), str(ROOT / "specs/bottlenet.yaml")]
    out = tmp_path / "eval.jsonl"
    assert main(["--arch", *specs, "--shard", "1/2", "--out", str(out), *ARGS]) == 0
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [ln["spec"] for ln in lines] == ["bottlenet"]  # shard 1 of 2: the second spec only
    assert set(lines[0]["top1"]) == {"float", "8", "4a4"}
    assert all(0.0 <= v <= 1.0 for v in lines[0]["top1"].values())
    out.write_text(out.read_text().replace(str(lines[0]["top1"]["float"]), "0.5", 1))  # mark the kept line
    capsys.readouterr()
    assert main(["--arch", *specs, "--out", str(out), "--resume", *ARGS]) == 0
    printed = [json.loads(ln)["spec"] for ln in capsys.readouterr().out.splitlines()]
    assert printed == ["sepnet"]  # bottlenet was already done
    final = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [ln["spec"] for ln in final] == ["bottlenet", "sepnet"] and final[0]["top1"]["float"] == 0.5


def test_bad_shard_is_a_clear_error() -> None:
    from ghnq.cli import UserError

    with pytest.raises(UserError, match="--shard"):
        main(["--arch", str(ROOT / "specs/sepnet.yaml"), "--shard", "2/2", *ARGS])
