"""ghnq.rank: Pareto fronts (hand-checked and by property), a bad spec among good ones, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghnq.cli import UserError
from ghnq.rank import dominates, main, pareto_fronts, pareto_order, parse_bits

ROOT = Path(__file__).resolve().parents[1]
# Fast everywhere: few images, few timed runs (the machine is shared; latency values are not asserted).
FAST = ["--images", "64", "--calib-images", "32", "--verify-images", "16", "--runs", "3", "--warmup", "1", "--quiet"]


def tiny(folder: Path, name: str, width: int, stages: int = 1) -> Path:
    body = "".join(f"  - {{block: conv, out: {width}, kernel: 3, stride: 2}}\n" for _ in range(stages))
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nstem: {{out: 8, kernel: 3, stride: 1, act: relu}}\nstages:\n{body}")
    return path


# ----------------------------------------------------------------------------------------------------
# Pareto fronts


def test_pareto_fronts_hand_checked() -> None:
    pts = [(0.90, 10.0),  # A: nothing is as accurate and faster → front 1
           (0.80, 5.0),   # B: dominated by G (as fast, more accurate) → front 2
           (0.85, 12.0),  # C: dominated by A (less accurate and slower); nothing in front 2 beats it → front 2
           (0.70, 6.0),   # D: dominated by G, then by B (front 2) → front 3
           (0.90, 10.0),  # E: equal to A: equal points do not dominate each other → front 1
           (0.60, 20.0),  # F: dominated by B, C, D → front 4
           (0.85, 5.0)]   # G: the fastest, and nothing that fast is more accurate → front 1
    assert pareto_fronts(pts) == [1, 2, 2, 3, 1, 4, 1]


def test_pareto_ties_on_one_objective() -> None:
    # Same accuracy, different latency: the slower is dominated. Same latency, different accuracy: likewise.
    assert pareto_fronts([(0.5, 1.0), (0.5, 2.0)]) == [1, 2]
    assert pareto_fronts([(0.4, 1.0), (0.5, 1.0)]) == [2, 1]
    assert pareto_fronts([(0.9, 3.0), (0.8, 2.0), (0.7, 1.0)]) == [1, 1, 1]  # a clean trade-off curve
    assert pareto_fronts([]) == []
    assert not dominates((0.5, 1.0), (0.5, 1.0))


def test_pareto_order_sorts_by_front_then_accuracy() -> None:
    rows = [{"name": n, "top1": {"8": a}, "latency_ms": t} for n, a, t in
            [("slow-good", 0.9, 10.0), ("fast-ok", 0.8, 5.0), ("bad", 0.5, 11.0), ("mid", 0.7, 8.0)]]
    ranked = pareto_order(rows)
    assert [r["name"] for r in ranked] == ["slow-good", "fast-ok", "mid", "bad"]
    assert [r["front"] for r in ranked] == [1, 1, 2, 3]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 10)), max_size=25))
def test_pareto_fronts_properties(raw: list[tuple[int, int]]) -> None:
    pts = [(a / 10, float(t)) for a, t in raw]
    fronts = pareto_fronts(pts)
    for i, p in enumerate(pts):
        # nothing in the same or a later front dominates a point ...
        assert not any(dominates(pts[j], p) for j in range(len(pts)) if fronts[j] >= fronts[i])
        # ... and a point outside front 1 is dominated by something in the front just before it
        if fronts[i] > 1:
            assert any(dominates(pts[j], p) for j in range(len(pts)) if fronts[j] == fronts[i] - 1)


def test_parse_bits() -> None:
    assert parse_bits("4") == (8, 4)
    assert parse_bits("8,4,2") == (8, 4, 2)
    assert parse_bits("4,8,4") == (8, 4)
    for bad in ("3", "8,x", ""):
        with pytest.raises(UserError, match="--bits"):
            parse_bits(bad)


# ----------------------------------------------------------------------------------------------------
# The command


def test_bad_spec_among_good_ones_is_reported_and_others_ranked(tmp_path: Path, capfd) -> None:
    good1, good2 = tiny(tmp_path, "good-a", 8), tiny(tmp_path, "good-b", 16, stages=2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("stem: {out: 8, kernel: 4}\nstages:\n  - {block: conv, out: 16}\n")
    missing = tmp_path / "missing.yaml"
    out = tmp_path / "rank"
    rc = main([str(good1), str(bad), str(missing), str(good2), "--bits", "8,4", "--out", str(out), *FAST])
    assert rc == 1  # some specs failed: reported, not fatal
    res = json.loads((out / "rank.json").read_text())
    assert sorted(r["name"] for r in res["ranked"]) == ["good-a", "good-b"]
    assert {f["spec"] for f in res["failed"]} == {str(bad), str(missing)}
    assert any("kernel" in f["error"] for f in res["failed"])  # the spec's own error names the key
    for r in res["ranked"]:
        assert set(r["top1"]) == {"8", "4"} and all(0.0 <= v <= 1.0 for v in r["top1"].values())
        assert r["latency_ms"] > 0 and r["verify_images"] == 16 and r["front"] >= 1
        assert Path(r["artifact"]).is_file()
    md = (out / "rank.md").read_text()
    assert "good-a" in md and "Not ranked (2)" in md and "kernel" in md
    assert (out / "rank.csv").read_text().splitlines()[0].startswith("rank,front,spec,top1_w8_%,top1_w4_%")
    assert (out / "rank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = capfd.readouterr().err  # fd level: the device run (eval.py) is a child process
    assert f"{bad}: not ranked" in err
    assert "img/s" not in err and "verified:" not in err and "INFO:" not in err, err  # --quiet reaches the device


def test_only_bad_specs_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: 3\n")
    with pytest.raises(UserError, match="no spec could be ranked"):
        main([str(bad), "--out", str(tmp_path / "rank"), *FAST])
    assert not (tmp_path / "rank" / "rank.md").exists()


@pytest.mark.parametrize("argv, match", [
    ([], "nothing to rank"), (["--bits", "5"], "--bits"), (["--images", "0"], "--images"),
    (["--target", "telnet://x"], "--target"), (["--method", "vibes"], "--method"),
])
def test_bad_flags_fail_before_any_work(tmp_path: Path, argv: list[str], match: str) -> None:
    spec = [] if match == "nothing to rank" else [str(tiny(tmp_path, "t", 8))]
    with pytest.raises(UserError, match=match):
        main([*spec, *argv, "--out", str(tmp_path / "rank")])
    assert not (tmp_path / "rank").exists()


def test_resume_after_kill_9_skips_finished_specs(tmp_path: Path) -> None:
    specs = [str(tiny(tmp_path, f"k{i}", 8 * (i + 1))) for i in range(3)]
    out = tmp_path / "rank"
    proc = subprocess.Popen([sys.executable, "-m", "ghnq.rank", *specs, "--bits", "8", "--out", str(out), *FAST],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    first: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        first = list(out.glob("cache/*/result.json"))
        if first:
            break
        time.sleep(0.05)
    assert first, "the first spec never finished"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("cache/*/result.json")}
    assert 1 <= len(done) < 3 and not (out / "rank.json").exists()

    assert main([*specs, "--bits", "8", "--out", str(out), *FAST]) == 0
    res = json.loads((out / "rank.json").read_text())
    assert sorted(r["name"] for r in res["ranked"]) == ["k0", "k1", "k2"]
    for p, (mtime, content) in done.items():  # finished specs were not redone ...
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == content
    cached = {r["name"] for r in res["ranked"] if r["from_cache"]}
    assert len(cached) == len(done)  # ... and were reported as taken from the cache
    # Other settings (another bit width list) re-evaluate: a cached row is only reused for identical settings.
    assert main([*specs[:1], "--bits", "8,4", "--out", str(out), *FAST]) == 0
    res = json.loads((out / "rank.json").read_text())
    assert not res["ranked"][0]["from_cache"] and set(res["ranked"][0]["top1"]) == {"8", "4"}
