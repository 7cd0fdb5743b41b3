"""Top-1 of predicted parameters on CIFAR-10, float and quantized, one JSON line per spec.

    python -m ghnq.evaluate --arch specs/resnet20.yaml specs/tiny-mbv2.yaml --bits float,8,4 --images 2000
    python -m ghnq.evaluate --heldout 100 --images 2000          # the fixed held-out sampled specs
    python -m ghnq.evaluate --arch specs/resnet20.yaml --init random   # baseline: random init + BN re-estimation

Prints {"spec": NAME, "top1": {"float": .., "8": .., "4": ..}} per spec (fractions 0..1). Protocol, for
every spec and bit width: predict parameters with the shipped checkpoint (conditioned on the bit width),
re-estimate BN statistics on `--bn-images` CIFAR-10 *training* images (cumulative average, float forward;
no gradient steps), then top-1 on the first `--images` test images of a fixed class-interleaved order:
- float: the nn.Module itself (eval mode).
- quantized, `--engine calibration` (default): `calibration.calibrate` on those training images (BN fold,
  min/max activation ranges, per-channel symmetric weights) and `calibration.simulate`, the simulation of
  the exported integer graph.
- quantized, `--engine fakequant`: ghnq/fakequant.py, the cheaper training-loop quantization with static
  ranges observed on the same images (what meta_train's in-loop evaluation uses).
"W4A4" is `--bits 4a4`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from calibration.bn import BN_BATCH
from ghnq.cli import UserError, run_cli
from ghnq.data import check_channels, fit_images, interleaved_order, load_cifar10, load_eval_images, to_float
from ghnq.fakequant import FakeQuantNet, finalize_stats
from ghnq.fileio import atomic_write_text
from ghnq.sampler import SPACES
from ghnq.spec import build_model, load_spec


def parse_bits(text: str) -> list[tuple[str, int | None, int | None]]:
    """"float,8,4,4a4" → [(label, weight bits, activation bits)]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("float", "fp32", "32"):
            out.append(("float", None, None))
        elif part in ("8", "4", "2"):
            out.append((part, int(part), 8))
        elif part in ("8a8", "4a8", "4a4", "2a8", "2a4"):
            w, a = part.split("a")
            out.append((part if a != "8" else w, int(w), int(a)))
        else:
            raise UserError(f"--bits: got {part!r}; allowed: a comma list of float, 8, 4, 2, 4a4 (W4A4), 2a4")
    return out


def to_x01(images: np.ndarray) -> Tensor:
    """uint8 NHWC → float NCHW in [0, 1] (what FakeQuantNet takes; normalization is folded into conv 1)."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def logits_predicted(net: FakeQuantNet, params: dict[str, Tensor], wbits: int | None, abits: int | None,
                     calib: Tensor, test: Tensor, batch: int = 250) -> Tensor:
    """The logits of every `test` image under the training loop's quantization, with everything the exported
    integer graph fixes at calibration done as calibration.calibrate does it on `calib` (x01 tensors):
    BN statistics re-estimated on the float nn.Module's input (normalized image, batches of BN_BATCH), and
    static activation ranges observed on the float graph (BN folded, float weights; the minmax observer)."""
    collect: dict = {}
    observe: dict = {}
    for i in range(0, len(calib), BN_BATCH):
        net(calib[i:i + BN_BATCH], params, bn="batch", collect=collect, fold_input=False)
    stats = finalize_stats(collect)
    if abits:
        for i in range(0, len(calib), batch):
            net(calib[i:i + batch], params, bn="stats", stats=stats, observe=observe)
    out = [net(test[i:i + batch], params, wbits=wbits, abits=abits, bn="stats", stats=stats, ranges=observe)
           for i in range(0, len(test), batch)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def classes_predicted(net: FakeQuantNet, params: dict[str, Tensor], wbits: int | None, abits: int | None,
                      calib: Tensor, test: Tensor, batch: int = 250) -> Tensor:
    """The argmax class of every `test` image under `logits_predicted`."""
    logits = logits_predicted(net, params, wbits, abits, calib, test, batch)
    return logits.argmax(1) if len(logits) else torch.zeros(0, dtype=torch.long)


def top1_predicted(net: FakeQuantNet, params: dict[str, Tensor], wbits: int | None, abits: int | None,
                   calib: Tensor, test: Tensor, labels: Tensor, batch: int = 250) -> float:
    """Top-1 of `classes_predicted` (the training loop's quantization) on `test`."""
    pred = classes_predicted(net, params, wbits, abits, calib, test, batch)
    return int((pred == labels.to(pred.device)).sum()) / max(1, len(test))


def calibration_uint8(n: int, root: str | None = None) -> np.ndarray:
    """The first n training images of the class-interleaved order (fixed, balanced), uint8 NHWC."""
    images, labels = load_cifar10("train", root, progress=False)
    return images[interleaved_order(labels)[:n]]


def calibration_images(n: int, root: str | None = None) -> Tensor:
    return to_x01(calibration_uint8(n, root))


@torch.no_grad()
def top1_module(model: nn.Module, wbits: int | None, abits: int | None, calib: np.ndarray, test: np.ndarray,
                labels: np.ndarray) -> float:
    """BN re-estimated on `calib`; float: the module; quantized: calibration.calibrate + simulate."""
    from calibration import calibrate, simulate
    from calibration.bn import recalibrate_bn

    if wbits is None:
        recalibrate_bn(model, calib, progress=False)
        model.eval()
        correct = 0
        for i in range(0, len(test), 500):
            correct += int((model(to_float(test[i:i + 500])).argmax(1).numpy() == labels[i:i + 500]).sum())
        return correct / len(test)
    qm = calibrate(model, calib, weight_bits=wbits, act_bits=abits or 8, bn_recalibrate=True, progress=False)
    codes = simulate(qm, test)
    return float((codes.argmax(1) == labels).mean())


def heldout_specs(n: int, space: str = "cifar") -> list[dict]:
    from ghnq.meta_train import heldout_specs as _heldout

    return _heldout(n, space)


def random_params(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """Baseline: PyTorch's default init, seeded."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@torch.no_grad()
def load_predicted(model: nn.Module, params: dict[str, Tensor]) -> None:
    """Predicted conv/linear parameters into the module; normalization layers to identity affine."""
    named = dict(model.named_parameters())
    for name, value in params.items():
        named[name].copy_(value)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            m.weight.fill_(1.0)
            m.bias.zero_()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ghnq.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="*", default=[], help="spec.yaml files")
    ap.add_argument("--heldout", type=int, default=0, help="also evaluate the first N held-out sampled specs")
    ap.add_argument("--heldout-space", choices=sorted(SPACES), default="cifar",
                    help="which held-out set: cifar (the one every BENCHMARKS figure uses), grammar (stride-2 "
                    "and 1x1/7x7 stems, wider stages: nets shaped like torchvision's) or deep (up to 7 stages x 4 "
                    "blocks, ~60 layers, like torchvision's mobile nets)")
    ap.add_argument("--bits", default="float,8,4", help="comma list: float, 8 (W8A8), 4 (W4A8), 4a4 (W4A4)")
    ap.add_argument("--images", type=int, default=2000, help="CIFAR-10 test images (fixed interleaved subset)")
    ap.add_argument("--bn-images", type=int, default=512, help="training images for BN re-estimation")
    ap.add_argument("--engine", choices=("calibration", "fakequant"), default="calibration",
                    help="quantized evaluation: the integer graph's simulation, or the training-loop fake-quant")
    ap.add_argument("--init", choices=("ghnq", "random"), default="ghnq", help="parameters: GHN-Q or random init")
    ap.add_argument("--checkpoint", default=None, help="GHN-Q checkpoint (default: the shipped one)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default=None, help="also write the JSON lines to this file")
    ap.add_argument("--resume", action="store_true", help="keep the specs already in --out, evaluate the rest")
    ap.add_argument("--shard", default="0/1", metavar="K/N",
                    help="evaluate only specs i with i %% N == K (run N processes side by side, one per core)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bits = parse_bits(args.bits)
    specs = [load_spec(p) for p in args.arch]
    for path, spec in zip(args.arch, specs, strict=True):
        check_channels(spec["input"][0], f"{path}: input")  # before any work, not midway through a sweep
    specs += heldout_specs(args.heldout, args.heldout_space)
    k, _, n = args.shard.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise UserError(f"--shard: got {args.shard!r}; expected K/N with 0 <= K < N, e.g. 1/2")
    shard, shards = int(k), int(n)
    specs = specs[shard::shards]
    lines: list[str] = []
    if args.resume and args.out and Path(args.out).is_file():
        lines = [ln for ln in Path(args.out).read_text().splitlines() if ln.strip()]
        done = {json.loads(ln)["spec"] for ln in lines}
        specs = [s for s in specs if s.get("name", "?") not in done]
    if not specs and not lines:
        raise UserError("nothing to evaluate: give --arch SPEC... and/or --heldout N")
    if args.images < 1 or args.bn_images < 1:
        raise UserError("--images and --bn-images must be >= 1")
    from ghnq.predict import load_checkpoint, predict_params

    ghn = None
    if args.init == "ghnq":
        ghn = load_checkpoint(args.checkpoint)
    images, labels, source = load_eval_images(args.images, args.data_root, quiet=True)
    y = torch.as_tensor(labels)
    calib_u8 = calibration_uint8(args.bn_images, args.data_root)
    print(f"# {len(specs)} specs; test: {len(images)} images from {source}; BN statistics re-estimated on "
          f"{len(calib_u8)} training images; init: {args.init}; engine: {args.engine}", file=sys.stderr)
    sized: dict[tuple[int, ...], tuple] = {}  # the images at each declared input size, resized once
    for spec in tqdm(specs, desc="evaluating", unit="spec", file=sys.stderr, disable=len(specs) < 3):
        key = tuple(spec["input"])
        if key not in sized:
            imgs, cal = (fit_images(x, key, f"{spec.get('name', '?')}: input") for x in (images, calib_u8))
            sized[key] = imgs, to_x01(imgs), cal, to_x01(cal)
        images_s, test, calib_u8_s, calib = sized[key]
        model = build_model(spec)
        net = FakeQuantNet(model)
        top1 = {}
        t0 = time.perf_counter()
        for label, wbits, abits in bits:
            if ghn is None:
                params = random_params(model, seed=0)
            else:
                params = predict_params(ghn, model, bits=str(wbits) if wbits else "float")
            if args.engine == "fakequant":
                acc = top1_predicted(net, params, wbits, abits, calib, test, y)
            else:
                load_predicted(model, params)
                acc = top1_module(model, wbits, abits, calib_u8_s, images_s, labels)
            top1[label] = round(acc, 4)
        line = json.dumps({"spec": spec.get("name", "?"), "top1": top1,
                           "seconds": round(time.perf_counter() - t0, 1)})
        print(line, flush=True)
        lines.append(line)
        if args.out:  # rewritten whole after each spec: a stopped sweep keeps every finished line
            atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
