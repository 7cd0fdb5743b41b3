"""GHN-Q meta-training: the loss goes down on real images; a kill -9 run resumes exactly."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ghnq.data import default_data_root, load_sample
from ghnq.evaluate import to_x01
from ghnq.meta_train import (
    HELDOUT_CONFIG,
    SpecPool,
    draw_specs,
    heldout_hashes,
    heldout_specs,
    learning_rate,
    log_gains,
    meta_net,
    parse_space,
    step_loss,
    update,
)
from ghnq.model import GHNQ, GHNConfig, collate
from ghnq.sampler import SamplerConfig, spec_hash

ROOT = Path(__file__).resolve().parents[1]


def test_heldout_excluded() -> None:
    held = heldout_specs(5)
    assert len({spec_hash(s) for s in held}) == 5 and heldout_hashes() >= {spec_hash(s) for s in held}
    assert heldout_specs(5) == held  # fixed set
    # ...and the same set every session's BENCHMARKS figures were measured on (a sampler change must not move it)
    assert [s["name"] for s in held[:3]] == ["s-695f2798a8", "s-a3f1a14228", "s-d14e9a9589"]
    # The grammar space has its own held-out set, also never trained on.
    wide = heldout_specs(5, "grammar")
    assert [s["name"] for s in wide[:3]] == ["s-fea96758d9", "s-1ff486d850", "s-0f23216c53"]  # session 9's set
    deep = heldout_specs(5, "deep")
    modern = heldout_specs(5, "modern")
    for other in (wide, deep, modern):
        assert {spec_hash(s) for s in other}.isdisjoint(spec_hash(s) for s in held)
        assert heldout_hashes() >= {spec_hash(s) for s in other}
    # A sampler stream that would hit a held-out spec must skip it.
    from ghnq.sampler import sample_spec

    rng = random.Random(1_000_000)  # the seed of held-out spec 0
    assert spec_hash(sample_spec(random.Random(1_000_000), HELDOUT_CONFIG)) == spec_hash(held[0])
    assert spec_hash(draw_specs(rng, 1, HELDOUT_CONFIG)[0]) != spec_hash(held[0])


def test_meta_training_lowers_loss() -> None:
    """A few Adam steps of the GHN on one fixed batch of real CIFAR-10 images, through the 4/8-bit
    fake-quant of two small sampled nets: the loss must drop (gradients reach the GHN through the STE)."""
    torch.manual_seed(0)
    specs = draw_specs(random.Random(7), 2, SamplerConfig(max_macs=1.5e6))
    nets = [meta_net(s) for s in specs]
    images, labels = load_sample()
    x01, y = to_x01(images[:32]), torch.as_tensor(labels[:32])
    ghn = GHNQ(GHNConfig(hidden=32, dec_hidden=16, dec_out=32, dec_in=32, hops=10))
    opt = torch.optim.Adam(ghn.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = step_loss(ghn, nets, ["4", "8"], x01, y, True, 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < losses[0] - 0.15, losses


def test_modern_space_trains_the_kinds_no_other_space_draws() -> None:
    """--space modern gives SiLU, GELU, sigmoid gates, grouped convs and concats (ShuffleNet units) their first
    training signal: a loss on its nets reaches those op kinds' embedding rows, which a loss on cifar-space nets
    leaves at exactly zero gradient (so until a run trains on it, GHN-Q encodes those ops with untrained rows)."""
    from ghnq.graph import KIND_INDEX

    images, labels = load_sample()
    x01, y = to_x01(images[:16]), torch.as_tensor(labels[:16])
    new_kinds = ("silu", "gelu", "sigmoid", "gconv", "cat")

    def kind_grads(space: str, n: int) -> dict[str, float]:
        torch.manual_seed(0)
        ghn = GHNQ(GHNConfig(hidden=32, dec_hidden=16, dec_out=32, dec_in=32, hops=10))
        specs = draw_specs(random.Random(3), n, parse_space(space, 3e6)[0])
        loss, _ = step_loss(ghn, [meta_net(s) for s in specs], ["4"] * n, x01, y, True, 10)
        loss.backward()
        return {k: ghn.kind_emb.weight.grad[KIND_INDEX[k]].abs().sum().item() for k in new_kinds}

    assert all(g > 0 for g in kind_grads("modern", 8).values())
    assert all(g == 0 for g in kind_grads("cifar", 8).values())


def test_log_gains_read_back_the_decoders_gain() -> None:
    """log_gains recovers the decoder's per-layer log-gain from the predicted weights alone."""
    torch.manual_seed(0)
    net, graph = meta_net(draw_specs(random.Random(3), 1, SamplerConfig(max_macs=1.5e6))[0])
    ghn = GHNQ(GHNConfig(hidden=32, dec_hidden=16, dec_out=32, dec_in=32, hops=10))
    with torch.no_grad():
        ghn.dec_gain.bias.fill_(2.5)
    seen: list[torch.Tensor] = []
    ghn.dec_gain.register_forward_hook(lambda m, i, o: seen.append(o.detach().flatten()))
    got = log_gains(ghn(collate([graph], 10), ["4"])[0])
    assert got.shape == seen[0].shape and torch.allclose(got, seen[0], atol=1e-4)


def test_gain_decay_is_a_penalty_on_the_squared_log_gains() -> None:
    """step_loss's gain penalty adds decay·mean(log-gain²) to the cross-entropy and pushes dec_gain's bias (which
    shifts every layer's log-gain by the same amount) by exactly 2·decay·mean(log-gain): the force that keeps
    BN-hidden gains from drifting, where the cross-entropy exerts almost none."""
    specs = draw_specs(random.Random(7), 2, SamplerConfig(max_macs=1.5e6))
    nets = [meta_net(s) for s in specs]
    images, labels = load_sample()
    x01, y = to_x01(images[:32]), torch.as_tensor(labels[:32])
    torch.manual_seed(0)
    ghn = GHNQ(GHNConfig(hidden=32, dec_hidden=16, dec_out=32, dec_in=32, hops=10))
    with torch.no_grad():
        ghn.dec_gain.bias.fill_(3.0)
    out = {}
    for decay in (0.0, 0.05):
        ghn.zero_grad()
        loss, stats = step_loss(ghn, nets, ["4", "float"], x01, y, True, 10, gain_decay=decay)
        loss.backward()
        out[decay] = (loss.item(), stats, ghn.dec_gain.bias.grad.item())
    (l0, s0, g0), (l1, s1, g1) = out[0.0], out[0.05]
    assert s0["ce"] == pytest.approx(s1["ce"], rel=1e-6) and l0 == pytest.approx(s0["ce"], rel=1e-6)
    assert s1["log_gain_mean"] > 2.5  # the bias set every layer's log-gain near 3
    gains = torch.cat([log_gains(p) for p in ghn(collate([g for _, g in nets], 10),
                                                   ["4", "float"])]).detach()
    assert l1 - l0 == pytest.approx(0.05 * float(gains.pow(2).mean()), rel=1e-3)
    assert g1 - g0 == pytest.approx(2 * 0.05 * float(gains.mean()), rel=1e-2)


def test_learning_rate_is_constant_then_a_half_cosine_to_the_final_rate() -> None:
    assert [learning_rate(s, 1e-3, None, 10, 0.0) for s in (0, 9, 10)] == [1e-3] * 3
    lrs = [learning_rate(s, 1e-3, 4, 12, 1e-5) for s in range(14)]
    assert lrs[:5] == [1e-3] * 5  # constant up to and at --decay-from
    assert lrs[8] == pytest.approx((1e-3 + 1e-5) / 2)  # halfway down the cosine
    assert lrs[12:] == [pytest.approx(1e-5)] * 2  # the final rate at --steps (and after, for a continued run)
    assert all(a > b for a, b in zip(lrs[4:12], lrs[5:13], strict=True))


def _log(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a torn last line from the kill
                out.append(json.loads(line))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not (default_data_root() / "train").is_dir(), reason="CIFAR-10 not present")
def test_kill9_resume_continues_exactly(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "ghnq.meta_train", "--meta-batch", "2", "--batch", "8", "--max-macs", "2e6",
            "--hidden", "16", "--threads", "1", "--checkpoint-every", "0", "--steps", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Reference: 4 uninterrupted steps.
    subprocess.run(args + ["--out", str(tmp_path / "ref")], check=True, cwd=ROOT, env=env, capture_output=True)
    ref = {r["step"]: r["loss"] for r in _log(tmp_path / "ref/log.jsonl") if "loss" in r}
    assert sorted(ref) == [1, 2, 3, 4]
    # Killed with SIGKILL once a checkpoint of step >= 2 exists, then resumed.
    run = tmp_path / "run"
    p = subprocess.Popen(args + ["--steps", "1000", "--out", str(run)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run / "checkpoint.pt").exists() and len([r for r in _log(run / "log.jsonl") if "loss" in r]) >= 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ck["step"] >= 2
    r = subprocess.run(args + ["--out", str(run)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "pass --resume" in r.stderr  # never silently restarts over a run
    subprocess.run(args + ["--out", str(run), "--resume"], check=True, cwd=ROOT, env=env, capture_output=True)
    last = {}
    for rec in _log(run / "log.jsonl"):
        if "loss" in rec:
            last[rec["step"]] = rec["loss"]
    assert last == ref  # the resumed run draws and computes exactly what the uninterrupted one did
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 4


def test_init_fine_tunes_from_another_run_with_4a4(tmp_path: Path) -> None:
    """--init starts a new run from a run's checkpoint (weights and step count), here 4-bit-heavy with 4-bit
    activations; the source run is untouched; bad --bits / --init are refused by name."""
    args = [sys.executable, "-m", "ghnq.meta_train", "--meta-batch", "2", "--batch", "8", "--max-macs", "2e6",
            "--hidden", "16", "--threads", "1", "--checkpoint-every", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(args + ["--steps", "2", "--out", str(tmp_path / "base")], check=True, cwd=ROOT, env=env,
                   capture_output=True)
    base = torch.load(tmp_path / "base/checkpoint.pt", weights_only=False)
    subprocess.run(args + ["--steps", "4", "--bits", "4a4,4", "--init", str(tmp_path / "base/checkpoint.pt"),
                          "--decay-from", "2", "--lr-final", "1e-4", "--out", str(tmp_path / "ft")],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    recs = [r for r in _log(tmp_path / "ft/log.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [3, 4]  # continues the step count of the run it starts from
    # the schedule picks up at the step the run starts from: steps 3, 4 are the cosine's first and second half
    assert [r["lr"] for r in recs] == [pytest.approx(1e-3), pytest.approx((1e-3 + 1e-4) / 2)]
    shipped_ft = torch.load(tmp_path / "ft/ghnq.pt", weights_only=False)["meta"]
    assert (shipped_ft["decay_from"], shipped_ft["lr_final"]) == (2, 1e-4)  # the schedule travels with the file
    assert {b for r in recs for b in r["bits"]} <= {"4a4", "4"}
    ft = torch.load(tmp_path / "ft/checkpoint.pt", weights_only=False)
    assert ft["step"] == 4 and ft["args"]["init"].endswith("base/checkpoint.pt")
    assert any(not torch.equal(ft["ghn"][k], base["ghn"][k]) for k in base["ghn"])
    assert torch.load(tmp_path / "base/checkpoint.pt", weights_only=False)["step"] == 2
    # --init also takes a shipped GHN file (what ghnq/assets/ghnq.pt is): weights and step, a fresh optimizer
    shipped = tmp_path / "base.pt"
    subprocess.run(args + ["--out", str(tmp_path / "base"), "--export", str(shipped)], check=True, cwd=ROOT, env=env,
                   capture_output=True)
    subprocess.run(args + ["--steps", "3", "--init", str(shipped), "--out", str(tmp_path / "ft-shipped")],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    assert [r["step"] for r in _log(tmp_path / "ft-shipped/log.jsonl") if "loss" in r] == [3]
    corrupt = torch.load(shipped, weights_only=False)
    first = next(iter(corrupt["state_dict"]))
    corrupt["state_dict"][first] = corrupt["state_dict"][first] + 1
    torch.save(corrupt, tmp_path / "corrupt.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save([1, 2], tmp_path / "list.pt")
    for bad, words in ((["--bits", "4a3"], "activation bits"), (["--bits", "floata4"], "quantized weights"),
                       (["--init", str(tmp_path / "nope.pt")], "no such training checkpoint"),
                       (["--decay-from", "3"], "--decay-from 3: must be a step in [0, --steps 3)"),
                       (["--init", str(tmp_path / "corrupt.pt")], "corrupt"),
                       (["--init", str(tmp_path / "notes.pt")], "notes.pt: not a readable checkpoint"),
                       (["--init", str(tmp_path / "list.pt")], "holds a list")):
        r = subprocess.run(args + ["--steps", "3", "--out", str(tmp_path / "bad")] + bad, cwd=ROOT, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_in_loop_evaluation_follows_eval_space_and_the_curve_keeps_spaces_apart(tmp_path: Path) -> None:
    """--eval-space picks whose held-out nets the in-loop evaluation uses; each evaluation line names its space,
    and the curve benchmark keeps the spaces apart (a line without the field is the cifar set, as before)."""
    from benchmarks.bench_ghnq_curve import STEP_FIELDS, condensed, read_log

    args = [sys.executable, "-m", "ghnq.meta_train", "--meta-batch", "1", "--batch", "8", "--max-macs", "2e6",
            "--hidden", "16", "--threads", "1", "--checkpoint-every", "0", "--eval-every", "1", "--eval-nets", "1",
            "--eval-images", "16", "--space", "deep"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = tmp_path / "run"
    subprocess.run(args + ["--steps", "1", "--eval-space", "deep", "--out", str(run)], check=True, cwd=ROOT, env=env,
                   capture_output=True)
    evals = [r for r in _log(run / "log.jsonl") if "eval" in r]
    assert [(r["step"], r["eval_space"], r["eval_nets"]) for r in evals] == [(1, "deep", 1)]
    assert set(evals[0]["eval"]) == {"float", "8", "4", "4a4"}
    assert all(0.0 <= v <= 1.0 for v in evals[0]["eval"].values())
    # an older run's evaluation line (no eval_space) reads as the cifar set
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 0, "eval": {"float": 0.1}, "eval_nets": 1, "eval_images": 16,
                            "elapsed": 0.0}) + "\n")
    steps, by_space = read_log(run)
    assert sorted(steps) == [1] and {k: sorted(v) for k, v in by_space.items()} == {"cifar": [0], "deep": [1]}
    # the condensed copy (what --keep commits) reads back as the same curve, step records cut to the plotted fields
    kept = tmp_path / "kept.jsonl"
    kept.write_text(condensed(steps, by_space))
    steps2, by_space2 = read_log(kept)
    assert by_space2 == by_space and steps2 == {s: {k: r[k] for k in STEP_FIELDS} for s, r in steps.items()}
    with pytest.raises(SystemExit, match="no such run log"):
        read_log(tmp_path / "missing")
    r = subprocess.run(args + ["--steps", "1", "--eval-space", "imagenet", "--out", str(tmp_path / "bad")],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--eval-space" in r.stderr and "deep" in r.stderr and "Traceback" not in r.stderr


def test_space_mixture_takes_turns_and_one_space_draws_as_before(tmp_path: Path) -> None:
    """--space a+b: the pool's new nets take turns between the spaces (each the very net that space alone would
    have drawn in that slot); a single space draws exactly what every earlier run drew; a bad name is refused."""
    def names(pool: SpecPool, step: int) -> list[str]:
        return [pool._get(step, j)[0]["name"] for j in range(2)]

    mixed = SpecPool(0, 1, parse_space("cifar+deep", 2e6), 2, 4)
    cifar = SpecPool(0, 1, parse_space("cifar", 2e6), 2, 4)
    deep = SpecPool(0, 1, parse_space("deep", 2e6), 2, 4)
    for step in (0, 3):
        assert names(mixed, step) == [names(cifar, step)[0], names(deep, step)[1]]
        # how runs before mixtures drew slot (step, j): seed-rank-step-j, one config
        before = [draw_specs(random.Random(f"0-1-{step}-{j}"), 1, SamplerConfig(max_macs=2e6))[0]["name"]
                  for j in range(2)]
        assert names(cifar, step) == before
    assert len({spec["name"] for spec, _, _ in mixed.batch(3, 8, random.Random(0))}) == 8
    with pytest.raises(Exception, match=r"--space 'cifar\+wide': unknown space 'wide'; allowed: cifar, deep"):
        parse_space("cifar+wide", 2e6)
    r = subprocess.run([sys.executable, "-m", "ghnq.meta_train", "--space", "cifar+", "--steps", "1", "--out",
                        str(tmp_path / "bad")], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--space 'cifar+'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (default_data_root() / "train").is_dir(), reason="CIFAR-10 not present")
def test_ddp_two_ranks_stay_in_sync(tmp_path: Path) -> None:
    """torchrun, 2 CPU ranks, gloo: each rank draws its own nets, gradients are all-reduced, so after a few
    steps both ranks hold bit-identical GHNs (checked by all_gather of the parameters inside the run)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "ghnq.meta_train", "--out",
           str(tmp_path / "ddp"), "--meta-batch", "1", "--batch", "8", "--max-macs", "2e6", "--hidden", "16",
           "--threads", "1", "--steps", "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    log = _log(tmp_path / "ddp/log.jsonl")
    assert [rec["step"] for rec in log if "loss" in rec] == [1, 2, 3]  # rank 0 logs, once per step
    sync = [rec for rec in log if "ddp_world" in rec]
    assert len(sync) == 1 and sync[0]["ddp_world"] == 2
    assert sync[0]["ddp_max_param_diff"] == 0.0
    rank0, rank1 = sync[0]["ddp_last_specs"]
    assert set(rank0).isdisjoint(rank1)  # the ranks trained on different architectures
    shipped = torch.load(tmp_path / "ddp/ghnq.pt", weights_only=True)
    assert shipped["meta"]["ranks"] == 2 and shipped["meta"]["meta_batch"] == 1  # 2 nets per step in all


def test_update_skips_a_non_finite_gradient() -> None:
    """A finite loss whose gradient is inf (sqrt at 0) leaves the weights and the optimizer untouched (it
    once wrote NaN into every GHN weight for good); a finite gradient steps as usual."""
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    before = [p.detach().clone() for p in lin.parameters()]
    loss = torch.sqrt(lin.weight - lin.weight.detach()).sum() + lin.bias.sum()  # value: bias sum; grad: inf
    assert torch.isfinite(loss)
    assert math.isnan(update(lin, opt, loss))
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters(), strict=True))
    assert not opt.state  # Adam's moments were not touched either
    assert math.isnan(update(lin, opt, torch.tensor(float("nan"))))
    norm = update(lin, opt, (lin.weight ** 2).sum() + lin.bias.sum())
    assert math.isfinite(norm) and norm > 0
    assert all(torch.isfinite(p).all() and not torch.equal(a, p) for a, p in zip(before, lin.parameters(), strict=True))


_DDP_NAN_RANK = """
import math, os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from ghnq.meta_train import update

def run(rank: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    ddp = DDP(torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(ddp.parameters(), lr=0.1)
    before = [p.detach().clone() for p in ddp.parameters()]
    out = ddp(torch.ones(4, 3)).sum()
    loss = out * float("nan") if rank == 1 else out  # only rank 1's loss is not finite
    skipped = math.isnan(update(ddp, opt, loss))
    same = all(torch.equal(a, b) for a, b in zip(before, ddp.parameters()))
    norm = update(ddp, opt, ddp(torch.ones(4, 3)).sum())  # the next, finite step runs on both ranks
    print(f"rank{rank} skipped={skipped} unchanged={same} next={math.isfinite(norm)}", flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=(sys.argv[1],), nprocs=2)
"""


def _run_two_gloo_ranks(tmp_path: Path, script_text: str) -> str:
    """Run a script that spawns 2 gloo ranks on a free local port; its stdout."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "two_ranks.py"
    script.write_text(script_text)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(script), port], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_update_under_ddp_skips_on_every_rank_when_one_loss_is_not_finite(tmp_path: Path) -> None:
    """2 gloo ranks, a NaN loss on rank 1 only: both ranks still run backward (the gradient all-reduce),
    both skip the step (no hang, no divergence between ranks), and the next finite step runs on both."""
    out = _run_two_gloo_ranks(tmp_path, _DDP_NAN_RANK)
    for rank in (0, 1):
        assert f"rank{rank} skipped=True unchanged=True next=True" in out, out


_DDP_TIME_UP = """
import os, sys, time
import torch, torch.distributed as dist
from ghnq.meta_train import time_is_up

def run(rank: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    now = time.time()
    started = now - 120 if rank == 1 else now  # only rank 1's clock is past the 1-minute limit
    up = time_is_up(started, 1.0, 2, torch.device("cpu"))
    fresh = time_is_up(now, 1.0, 2, torch.device("cpu"))  # neither rank out of time: neither stops
    print(f"rank{rank} up={up} fresh={fresh}", flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=(sys.argv[1],), nprocs=2)
"""


def test_max_minutes_stops_every_ddp_rank_at_the_same_step(tmp_path: Path) -> None:
    """--max-minutes under DDP: when one rank's clock crosses the limit, every rank stops at that step (a rank
    leaving alone would hang the others in the next all-reduce)."""
    out = _run_two_gloo_ranks(tmp_path, _DDP_TIME_UP)
    for rank in (0, 1):
        assert f"rank{rank} up=True fresh=False" in out, out
