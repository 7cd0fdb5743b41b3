"""benchmarks.bench_rank_trust: rank correlations on known rankings, the per-spec cache and resume, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.bench_rank_trust import correlations, kendall_tau_b_np, load_rows, report, spearman_rho_np, train_phase
from ghnq.cli import UserError
from ghnq.data import load_sample
from ghnq.sampler import spec_hash
from ghnq.spec import build_model, validate_spec

# ----------------------------------------------------------------------------------------------------
# τ and ρ


@pytest.mark.parametrize("fn", ["numpy", "correlations"])
def test_identical_and_reversed_rankings(fn: str) -> None:
    x = np.array([0.1, 0.5, 0.3, 0.9, 0.7])
    for y, want in ((x * 2 + 1, 1.0), (-x, -1.0)):
        if fn == "numpy":
            got = (kendall_tau_b_np(x, y), spearman_rho_np(x, y))
        else:
            c = correlations(x, y)
            got = (c["kendall_tau_b"], c["spearman_rho"])
        assert got == pytest.approx((want, want))


@pytest.mark.parametrize("fn", ["numpy", "correlations"])
def test_hand_checked_cases(fn: str) -> None:
    def both(x: list[float], y: list[float]) -> tuple[float, float]:
        if fn == "numpy":
            return kendall_tau_b_np(np.array(x), np.array(y)), spearman_rho_np(np.array(x), np.array(y))
        c = correlations(np.array(x), np.array(y))
        return c["kendall_tau_b"], c["spearman_rho"]

    # Two adjacent swaps: 8 concordant, 2 discordant pairs → τ = 0.6; Σd² = 4 → ρ = 1 − 6·4/(5·24) = 0.8.
    assert both([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx((0.6, 0.8))
    # A tie in x: 5 concordant pairs, 5 untied x-pairs, 6 untied y-pairs → τ-b = 5/√30;
    # ranks x = (1, 2.5, 2.5, 4): ρ = 4.5/√(4.5·5).
    assert both([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx((5 / np.sqrt(30), 4.5 / np.sqrt(22.5)))


def test_scipy_agrees_with_numpy_on_random_data() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 6, 25).astype(float), rng.integers(0, 6, 25).astype(float)  # many ties
    assert kendall_tau_b_np(x, y) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic)
    assert spearman_rho_np(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_too_few_specs_give_nan_not_a_number() -> None:
    c = correlations(np.array([0.1, 0.2]), np.array([0.3, 0.1]))
    assert c["n"] == 2 and np.isnan(c["kendall_tau_b"]) and np.isnan(c["spearman_rho"])
    with pytest.raises(ValueError, match="differ in length"):
        correlations(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0]))


# ----------------------------------------------------------------------------------------------------
# Phase (a): cache and resume, with a fake trainer (random init saved as "trained" weights)


def tiny_spec(width: int) -> dict:
    return validate_spec({"name": f"t{width}", "stem": {"out": 8, "kernel": 3, "stride": 2, "act": "relu"},
                          "stages": [{"block": "conv", "out": width, "kernel": 3, "stride": 2}]})


SETTINGS = {"epochs": 1, "train_images": 16, "seed": 0, "images": 24, "calib_images": 16, "method": "minmax",
            "test_order": "interleaved_order[:images]"}


class FakeTrainer:
    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, spec: dict, folder: Path) -> Path:
        self.calls.append(spec["name"])
        if spec["name"] == self.fail_on:
            raise RuntimeError("killed mid-training")
        torch.manual_seed(len(spec["name"]))
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(build_model(spec).state_dict(), folder / "weights.pt")
        return folder / "weights.pt"


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_sample()
    return x[:16], x[16:40], y[16:40]


def test_resume_skips_finished_specs_and_retrains_on_new_settings(tmp_path: Path, images) -> None:
    calib, test, labels = images
    specs = [tiny_spec(8), tiny_spec(12)]
    quiet = lambda msg: None  # noqa: E731

    crash = FakeTrainer(fail_on="t12")
    with pytest.raises(RuntimeError, match="killed"):
        train_phase(specs, tmp_path, SETTINGS, calib, test, labels, crash, quiet)
    rows = load_rows(tmp_path / "trained.json")  # the first spec survived the crash of the second
    assert list(rows) == [spec_hash(specs[0])[:16]] and crash.calls == ["t8", "t12"]
    row = rows[spec_hash(specs[0])[:16]]
    assert set(row["top1"]) == {"float", "8", "4", "4a4"} and all(0 <= v <= 1 for v in row["top1"].values())
    assert row["macs"] > 0 and row["settings"] == SETTINGS

    again = FakeTrainer()
    rows = train_phase(specs, tmp_path, SETTINGS, calib, test, labels, again, quiet)
    assert again.calls == ["t12"] and len(rows) == 2  # only the unfinished spec
    assert rows[spec_hash(specs[0])[:16]] == row  # the cached row untouched

    third = FakeTrainer()
    train_phase(specs, tmp_path, SETTINGS, calib, test, labels, third, quiet)
    assert third.calls == []

    other = FakeTrainer()
    rows = train_phase(specs, tmp_path, {**SETTINGS, "epochs": 2}, calib, test, labels, other, quiet)
    assert other.calls == ["t8", "t12"] and all(r["settings"]["epochs"] == 2 for r in rows.values())

    fewer = FakeTrainer()  # --trained-bits float,8: a new schedule, only the asked sims
    rows = train_phase(specs, tmp_path, {**SETTINGS, "bits": "float,8"}, calib, test, labels, fewer, quiet)
    assert fewer.calls == ["t8", "t12"] and all(set(r["top1"]) == {"float", "8"} for r in rows.values())


def test_damaged_cache_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "trained.json").write_text("{not json")
    with pytest.raises(UserError, match="trained.json: not a result cache"):
        load_rows(tmp_path / "trained.json")


# ----------------------------------------------------------------------------------------------------
# Report over partial results


def test_report_pairs_only_specs_both_phases_have(tmp_path: Path) -> None:
    specs = [tiny_spec(w) for w in (4, 6, 8, 10, 12)]
    hashes = [spec_hash(s)[:16] for s in specs]
    trained = {h: {"name": s["name"], "hash": h, "macs": 1000 * (i + 1), "params": 50 * (5 - i),
                   "top1": {"float": 0.2 + i / 20, "8": 0.2 + i / 20, "4": 0.15, "4a4": 0.1}, "train_seconds": 60.0}
               for i, (s, h) in enumerate(zip(specs, hashes, strict=True)) if i < 4}  # spec 5 not trained yet
    ckpt = {"checkpoint_sha256": "ab" * 32}
    predicted = {h: {"hash": h, "top1": {"float": 0.1 + i / 30, "8": 0.1 + i / 30, "4": 0.1}, "settings": ckpt}
                 for i, h in enumerate(hashes)}
    png = tmp_path / "scatter.png"
    res = report(specs, trained, predicted, tmp_path / "predicted-x.json", tmp_path, png, SETTINGS, "sample")
    assert res["trained_done"] == 4 and res["paired"] == 4
    assert res["predicted_vs_trained_w8a8"]["kendall_tau_b"] == pytest.approx(1.0)
    assert res["params_vs_trained_w8a8"]["spearman_rho"] == pytest.approx(-1.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "trust.md").read_text()
    assert "4 of 5 held-out specs" in md and md.count(f"| {hashes[0][:12]} |") == 1
    assert json.loads((tmp_path / "trust.json").read_text())["paired"] == 4
