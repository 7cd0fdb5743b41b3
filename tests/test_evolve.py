"""ghnq.evolve: the batched population fitness is the sim, the search improves fitness with integer weights only,
and a kill -9 mid-search resumes from the last checkpoint with the same best fitness (and the same result)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from calibration import calibrate
from calibration.qmodel import load as load_qm
from calibration.qmodel import save as save_qm
from calibration.sim import Simulator, input_codes
from ghnq.cli import UserError
from ghnq.data import default_data_root, load_cifar10
from ghnq.evolve import EvolveConfig, Layout, PopulationFitness, Search, main, with_codes
from ghnq.spec import build_model, load_spec

pytestmark = pytest.mark.skipif(not (default_data_root() / "train").is_dir(), reason="CIFAR-10 not present")
ROOT = Path(__file__).resolve().parents[1]
TINY = """name: tiny-evolve
input: [3, 32, 32]
num_classes: 10
stem: {out: 8, kernel: 3, stride: 2, act: relu}
stages:
  - {block: conv, out: 16, kernel: 3, stride: 2}
  - {block: basic, out: 16, stride: 1}
"""


@pytest.fixture(scope="module")
def subset() -> tuple[np.ndarray, np.ndarray]:
    """A small real subset: 768 CIFAR-10 training images of a fixed shuffle."""
    images, labels = load_cifar10("train", progress=False)
    order = np.random.default_rng(0).permutation(len(labels))[:768]
    return images[order], labels[order]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, subset) -> tuple[Path, Path, object]:
    """(spec path, float weights path, 4-bit QuantizedModel) of a tiny net trained for a few SGD steps."""
    d = tmp_path_factory.mktemp("tiny")
    spec = d / "tiny.yaml"
    spec.write_text(TINY)
    torch.manual_seed(0)
    model = build_model(load_spec(spec))
    from ghnq.data import to_float

    x, y = to_float(subset[0][:512]), torch.from_numpy(subset[1][:512]).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(30):  # a briefly trained net: better than chance, far from converged
        i = (step * 64) % 512
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
        opt.step()
    model.eval()
    weights = d / "weights.pt"
    torch.save(model.state_dict(), weights)
    qm = calibrate(model, subset[0][:256], weight_bits=4, progress=False)
    return spec, weights, qm


@pytest.mark.parametrize("rounding", ["tflite", "float"])
def test_population_fitness_is_the_sim(tiny, subset, rounding: str) -> None:
    """Logits of every individual equal Simulator.forward with that individual's codes, bit for bit."""
    _, _, qm = tiny
    layout = Layout.of(qm)
    pf, sim = PopulationFitness(qm, layout, rounding=rounding), Simulator(qm, rounding=rounding)
    assert pf.dtype == torch.float32 and sim.dtype == torch.float64  # the exact-float32 path is what is tested
    x = torch.from_numpy(input_codes(subset[0][:48]))
    g = torch.Generator().manual_seed(1)
    context = layout.flat(qm).clone()
    context[:50] = 0  # a context different from the QM's own codes
    pf.set_context(context)
    base = {k: layout.tensor(context, i) for i, k in enumerate(layout.keys)}
    for layers in ([0], [1], [2, 3], [4], list(range(len(layout.keys)))):
        codes = {k: torch.randint(-7, 8, (3, *layout.shapes[k]), generator=g).to(torch.int8) for k in layers}
        out = pf.logit_codes(x, codes, batch_id=("t", tuple(layers)))
        for p in range(3):
            ref = sim.forward(x, {**base, **{layout.keys[k]: codes[k][p] for k in layers}})
            assert torch.equal(out[p], ref), f"layers {layers}, individual {p}"
    with pytest.raises(TypeError, match="integer"):
        pf.set_context(context.float())


def test_fitness_of_a_model_ending_in_softmax_scores_its_log_probabilities(subset) -> None:
    """A QM whose output is an integer softmax: the fitness is the cross-entropy of log p (p = the output codes'
    probabilities, a zero code counted as half a step), not a softmax of the probabilities again."""
    from tests.nets import SoftmaxNet

    torch.manual_seed(0)
    qm = calibrate(SoftmaxNet(), subset[0][:128], weight_bits=4, progress=False)
    pf = PopulationFitness(qm, Layout.of(qm))
    x, y = torch.from_numpy(input_codes(subset[0][:64])), torch.from_numpy(subset[1][:64]).long()
    loss, acc = pf.fitness(x, y, {})
    p = (Simulator(qm).forward(x).double() + 128) / 256
    logp = torch.log(p.clamp_min(1 / 512))
    want = (torch.logsumexp(logp, 1) - logp.gather(1, y[:, None])[:, 0]).mean()
    assert pf.probabilities and torch.allclose(loss.double(), want.view(1), atol=1e-5)
    assert float(acc) == float((p.argmax(1) == y).double().mean())


def test_search_improves_fitness_with_integer_weights_only(tiny, subset, monkeypatch) -> None:
    _, _, qm = tiny
    cfg = EvolveConfig(pop=8, group_size=64, groups_per_round=4, gens=3, batch=64, monitor_images=512, seed=0)
    search = Search(qm, subset[0], subset[1], cfg)
    n = search.layout.n
    seen = {"codes": 0, "groups": 0}

    real_logits = PopulationFitness.logit_codes

    def checked_logits(self, x, codes, batch_id=None):  # every candidate network reaching the sim is int8 codes
        for c in codes.values():
            assert c.dtype == torch.int8
        seen["codes"] += 1
        return real_logits(self, x, codes, batch_id)

    real_group = Search.evolve_group

    def checked_group(self, g):  # after every group: no float tensor holds weights anywhere in the search state
        out = real_group(self, g)
        for name, t in self.state().items():
            if isinstance(t, torch.Tensor) and t.shape[-1:] == (n,):
                assert t.dtype == torch.int8, f"state[{name!r}] is {t.dtype}"
        for name, v in vars(self).items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.shape[-1:] != (n,), f"float tensor {name!r} of weight size"
        seen["groups"] += 1
        return out

    monkeypatch.setattr(PopulationFitness, "logit_codes", checked_logits)
    monkeypatch.setattr(Search, "evolve_group", checked_group)
    search.run(budget=600, progress=False)
    start, final = search.history[0], search.history[-1]
    assert seen["groups"] >= 15 and seen["codes"] > seen["groups"]
    assert search.accepted > 0 and final["changed_weights"] > 0
    assert final["monitor_loss"] < start["monitor_loss"] - 1e-3, (start, final)
    # the monitor numbers are the sim's: re-measure the output model from scratch
    out = with_codes(qm, search.layout, search.best)
    sim = Simulator(out, rounding=cfg.rounding)
    idx = search.monitor.numpy()
    logits = sim.run(subset[0][idx]).astype(np.int64)
    assert np.isclose((logits.argmax(1) == subset[1][idx]).mean(), final["monitor_acc"])
    t = out.tensors[search.layout.keys[0]]
    assert t.data.dtype == np.int8 and np.abs(t.data).max() <= 7
    # the exporter takes the evolved QuantizedModel as it is: the int8 .tflite (4-bit values in int8
    # containers) computes what the sim computes (LiteRT reference kernels, same top-1)
    from export.tflite import LiteRTRunner, build_tflite

    images = subset[0][idx[:128]]
    runner = LiteRTRunner(build_tflite(out), "ref")
    got = runner(input_codes(images)).astype(np.int64)
    want = Simulator(out).run(images).astype(np.int64)
    assert np.abs(got - want).max() <= 1
    assert (got.argmax(1) == subset[1][idx[:128]]).mean() == (want.argmax(1) == subset[1][idx[:128]]).mean()


def _cli(out: Path, spec: Path, weights: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ghnq.evolve", "--arch", str(spec), "--bits", "4", "--init", "ptq", "--weights",
            str(weights), "--budget-evals", "600", "--out", str(out), "--train-images", "768", "--calib-images",
            "256", "--eval-images", "0", "--pop", "8", "--group-size", "64", "--groups-per-round", "4", "--gens", "3",
            "--batch", "64", "--monitor-images", "256", "--checkpoint-every", "0", "--threads", "1", "--no-progress",
            *extra]


@pytest.mark.slow
def test_kill9_resume_continues_with_same_best_fitness(tiny, tmp_path: Path) -> None:
    spec, weights, _ = tiny
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ref = tmp_path / "ref"
    subprocess.run(_cli(ref, spec, weights), check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)

    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(run, spec, weights), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    state = run / "evolve-state.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=False)["evals"] >= 150:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed: raise --budget-evals"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(state, weights_only=False)
    assert 0 < ckpt["evals"] < 600 and not (run / "tiny-evolve.qm").exists()

    res = subprocess.run(_cli(run, spec, weights, "--resume"), env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"best fitness {ckpt['best_fitness']['loss']:.6f}" in res.stderr
    resumed = torch.load(state, weights_only=False)
    # the history up to the checkpoint is kept, and the run ends exactly where the uninterrupted one did
    assert resumed["history"][:len(ckpt["history"])] == ckpt["history"]
    a, b = load_qm(ref / "tiny-evolve.qm"), load_qm(run / "tiny-evolve.qm")
    for k in Layout.of(a).keys:
        assert np.array_equal(a.tensors[k].data, b.tensors[k].data), k
    assert resumed["best_fitness"] == torch.load(ref / "evolve-state.pt", weights_only=False)["best_fitness"]


def test_cli_errors(tiny, tmp_path: Path) -> None:
    spec, weights, qm = tiny
    base = ["--arch", str(spec), "--budget-evals", "200", "--out", str(tmp_path / "o")]
    with pytest.raises(UserError, match=r"--budget-evals 81: one group costs 82 .*at least 82"):  # 16 × 5 + 2
        main([*base[:2], "--budget-evals", "81", *base[4:], "--init", "ptq", "--weights", str(weights)])
    with pytest.raises(UserError, match="--weights"):
        main(base + ["--init", "ptq"])
    with pytest.raises(UserError, match="no such file"):
        main(base + ["--init", "ckpt", "--weights", str(tmp_path / "none.qm")])
    from ghnq.weights import ghnq_checkpoint

    if ghnq_checkpoint() is None:
        with pytest.raises(UserError, match="no GHN-Q checkpoint"):
            main(base + ["--init", "ghnq"])
    with pytest.raises(UserError, match="--resume"):
        main(base + ["--init", "ptq", "--weights", str(weights), "--resume"])
    qm_path = save_qm(qm, tmp_path / "start.qm")
    with pytest.raises(UserError, match="bit"):
        main(base + ["--init", "ckpt", "--weights", str(qm_path), "--bits", "2", "--eval-images", "0",
                     "--train-images", "64"])
    r = subprocess.run([sys.executable, "-m", "ghnq.evolve", *base, "--pop", "1", "--init", "ptq", "--weights",
                        str(weights)], env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]  # (torch may print an unrelated import warning first)
    assert r.returncode == 2 and last.startswith("error: --pop 1") and "Traceback" not in r.stderr
