"""The fake-quant used in GHN-Q's training loop: levels, BN-fold equivariance, quantization points."""

from __future__ import annotations

from pathlib import Path

import torch

from ghnq.fakequant import FakeQuantNet, finalize_stats, fq_act, fq_weight
from ghnq.spec import build_model, load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_weight_levels_and_ste() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    for bits in (8, 4, 2):
        q = fq_weight(w, bits)
        for c in range(8):
            scale = w[c].abs().max() / (2 ** (bits - 1) - 1)
            codes = q[c] / scale
            assert torch.allclose(codes, codes.round(), atol=1e-4)
            assert codes.abs().max() <= 2 ** (bits - 1) - 1 + 1e-4
        q.sum().backward()
        assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
        w.grad = None
    assert fq_weight(w, None) is w


def test_bn_fold_commutes_with_per_channel_quant() -> None:
    """fq(W * s) == s * fq(W) for positive per-channel s: conv(fq(W)) → BN is the folded quantized conv."""
    torch.manual_seed(1)
    w = torch.randn(16, 8, 3, 3)
    s = torch.rand(16).add(0.1).view(-1, 1, 1, 1)
    assert torch.allclose(fq_weight(w * s, 4), s * fq_weight(w, 4), atol=1e-6)


def test_act_quant() -> None:
    x = torch.linspace(-1, 3, 1000)
    q = fq_act(x, 8)
    assert len(torch.unique(q)) <= 256 and (q - x).abs().max() <= 4 / 255 / 2 + 1e-6
    assert (q == 0).any()  # zero is exactly representable
    assert fq_act(x, None) is x


def test_quant_points_follow_fusion() -> None:
    net = FakeQuantNet(build_model(load_spec(ROOT / "specs/resnet20.yaml")))
    pts = net.points
    assert "stem_0" not in pts and "stem_1" not in pts and "stem_2" in pts      # conv → BN → ReLU fused
    assert "add" not in pts and "stages_0_act" in pts                            # add + ReLU fused
    assert "stages_0_conv2_1" in pts                                             # BN feeding an add: materialized
    net2 = FakeQuantNet(build_model(load_spec(ROOT / "specs/tiny-mbv2.yaml")))
    assert "mul" in net2.points and "stages_3_se_scale_activation" in net2.points


def test_functional_run_matches_module() -> None:
    """Float, batch-stat BN: FakeQuantNet with the module's own parameters equals the module in train mode.

    (With the input normalization folded into the first conv, zero padding means pixel 0 instead of the
    mean pixel, as in the integer graph; so compare with the fold off.)"""
    torch.manual_seed(0)
    model = build_model(load_spec(ROOT / "specs/tiny-mbv2.yaml"))
    net = FakeQuantNet(model)
    assert net.fold_input
    net.fold_input = False
    x01 = torch.rand(16, 3, 32, 32)
    from ghnq.data import MEAN, STD

    xn = (x01 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    params = dict(model.named_parameters())
    collect: dict = {}
    y = net(x01, params, bn="batch", collect=collect)
    assert torch.allclose(y, model.train()(xn), atol=1e-4)
    stats = finalize_stats(collect)
    y8 = net(x01, params, wbits=8, abits=8, bn="stats", stats=stats)
    assert torch.isfinite(y8).all() and not torch.equal(y8, y)


def test_dropout_acts_only_in_the_training_forward() -> None:
    """sepnet's head dropout: the training forward is random (and its mean output unchanged), while BN
    re-estimation and evaluation are deterministic, as calibration.bn and the integer graph are."""
    from ghnq.evaluate import logits_predicted

    torch.manual_seed(0)
    model = build_model(load_spec(ROOT / "specs/sepnet.yaml"))
    net = FakeQuantNet(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x01, calib = torch.rand(8, 3, 32, 32), torch.rand(64, 3, 32, 32)
    a, b = net(x01, params), net(x01, params)  # training forward: bn="batch", nothing collected
    assert not torch.equal(a, b)
    for wbits, abits in ((None, None), (4, 8)):
        first = logits_predicted(net, params, wbits, abits, calib, x01)
        assert torch.equal(first, logits_predicted(net, params, wbits, abits, calib, x01))
    # the evaluation equals the module itself in eval mode after calibration.bn's re-estimation
    from calibration.bn import recalibrate_bn

    images = (calib.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    recalibrate_bn(model, images, batch_size=len(images), progress=False)
    from ghnq.data import to_float

    x_u8 = (x01.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    calib_q = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x_q = torch.from_numpy(x_u8).permute(0, 3, 1, 2).float() / 255
    net.fold_input = False  # the module pads with the mean pixel, not pixel 128
    ours = logits_predicted(net, params, None, None, calib_q, x_q)
    assert torch.allclose(ours, model.eval()(to_float(x_u8)), atol=1e-3)


def _textbook_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = x.detach().min().clamp(max=0), x.detach().max().clamp(min=0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8)
    zp = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 2 ** bits - 1) - zp) * scale


def test_in_place_fake_quant_equals_the_textbook_formula() -> None:
    """The fast fq_act / fq_weight (in-place, custom straight-through Function) compute exactly the textbook
    fake-quant values, and the gradient reaching the float input is the upstream gradient unchanged."""
    torch.manual_seed(3)
    x = (torch.randn(4, 8, 6, 6) * 2 + 0.3).requires_grad_()
    for bits in (8, 4):
        assert torch.equal(fq_act(x, bits), _textbook_act(x, bits))
        up = torch.randn_like(x)
        (g,) = torch.autograd.grad(fq_act(x, bits), x, up)
        assert torch.equal(g, up)
    xc = x.detach().contiguous(memory_format=torch.channels_last)  # the loop's NHWC layout: same values
    assert torch.equal(fq_act(xc, 8), fq_act(x.detach(), 8))
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    scale = w.detach().abs().flatten(1).amax(1).view(-1, 1, 1, 1) / 7
    assert torch.equal(fq_weight(w, 4), torch.clamp(torch.round(w.detach() / scale), -7, 7) * scale)


def test_native_and_explicit_batch_norm_agree() -> None:
    """Training-mode BN through F.batch_norm (the fast default) and the spelled-out batch statistics give the
    same logits and the same gradients on a full network (in float: with quantization in the loop, a 1e-7
    difference can move a value across a rounding boundary, which is not what this test is about)."""
    torch.manual_seed(4)
    model = build_model(load_spec(ROOT / "specs/tiny-mbv2.yaml"))
    net = FakeQuantNet(model)
    x01 = torch.rand(16, 3, 32, 32)
    out = {}
    for kernel in ("native", "explicit"):
        params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
        net.batch_norm_kernel = kernel
        y = net(x01, params)
        y.square().sum().backward()
        out[kernel] = (y.detach(), {k: p.grad for k, p in params.items()})
    (ya, ga), (yb, gb) = out["native"], out["explicit"]
    assert torch.allclose(ya, yb, atol=1e-5, rtol=1e-4)
    assert [k for k in ga if ga[k] is None] == [k for k in gb if gb[k] is None]  # BN affine: not used
    for k in (k for k in ga if ga[k] is not None):
        assert torch.allclose(ga[k], gb[k], atol=1e-4 * float(gb[k].abs().max()) + 1e-7), k


def test_loop_bn_statistics_equal_calibrations() -> None:
    """The train loop's BN re-estimation (collect → finalize_stats, batches of BN_BATCH) leaves exactly the
    statistics calibration.bn.recalibrate_bn puts in the model (which the integer graph is built from),
    an unequal last batch included. (Input fold off, as logits_predicted does for BN: the float nn.Module pads
    with the mean pixel; the folded input pads with pixel 128, as the integer graph does at inference.)"""
    import numpy as np

    from calibration.bn import BN_BATCH, recalibrate_bn

    torch.manual_seed(0)
    model = build_model(load_spec(ROOT / "specs/tiny-mbv2.yaml"))
    net = FakeQuantNet(model)
    images = np.random.default_rng(0).integers(0, 256, (2 * BN_BATCH + 37, 32, 32, 3), dtype=np.uint8)
    x01 = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    params = {k: v.detach() for k, v in model.named_parameters()}
    collect: dict = {}
    with torch.no_grad():
        for i in range(0, len(images), BN_BATCH):
            net(x01[i:i + BN_BATCH], params, bn="batch", collect=collect, fold_input=False)
    stats = finalize_stats(collect)
    recalibrate_bn(model, images, progress=False)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert set(stats) == set(bns)
    for name, (mean, var) in stats.items():
        torch.testing.assert_close(mean, bns[name].running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var, bns[name].running_var, rtol=1e-4, atol=1e-5)


def test_train_loop_quantization_tracks_the_integer_graph() -> None:
    """Honest quantization in the loop: for a held-out spec with GHN-Q weights, the train loop's W8A8 logits
    (BN re-estimated, static ranges) sit within a small fraction of an int8 step of the integer graph's sim
    built by calibration on the same images. Measured on 3 held-out specs x W8/W4, 256 sample images: 0.008-0.19
    mean steps, never more than 1; with BN statistics from the folded input and ranges observed on the
    fake-quantized net (session 4) 0.34-0.70, max 3; with the older pooled BN estimator 1.8-2.2."""
    import numpy as np

    from calibration import calibrate
    from calibration.sim import Simulator
    from ghnq.data import SAMPLE_PATH
    from ghnq.evaluate import heldout_specs, load_predicted, logits_predicted, to_x01
    from ghnq.predict import load_checkpoint, predict_params

    images = np.load(SAMPLE_PATH)["images"]  # real CIFAR-10 images, embedded in the repo
    calib, test = images[:256], images[256:384]
    spec = heldout_specs(1)[0]
    model = build_model(spec)
    params = predict_params(load_checkpoint(), model, bits="8")
    loop = logits_predicted(FakeQuantNet(model), params, 8, 8, to_x01(calib), to_x01(test)).numpy()
    load_predicted(model, params)
    qm = calibrate(model, calib, weight_bits=8, act_bits=8, bn_recalibrate=True, progress=False)
    codes = Simulator(qm, rounding="xnnpack").run(test).astype(np.float64)
    scale, zp = qm.output_qparams()
    steps = np.abs(loop / scale - (codes - zp))
    assert steps.mean() < 0.25 and steps.max() < 1.5, (steps.mean(), steps.max())
    assert np.std(codes) > 3  # the logits are spread over many steps: the check above is not vacuous
