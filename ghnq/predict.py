"""Predict parameters for any nn.Module with the shipped GHN-Q checkpoint.

    import ghnq
    model = ghnq.predict(model, bits=8)       # conv/linear weights and biases filled in place

    python -m ghnq.predict --arch specs/resnet20.yaml --bits 8 -o weights.pt

Prediction only fills parameters: it does not train, switch modes or print. Normalization layers get
weight 1, bias 0 and fresh running statistics (calibration re-estimates BN statistics on real images).
The command also re-estimates them (`--bn-images`, 512 training images by default) before it saves, so the
file is a complete float model: `export.tflite --weights weights.pt` then matches the default GHN-Q export.
The checkpoint file carries the GHN's config, its state_dict and a sha256 of that state_dict's tensors;
a damaged or mismatched file is refused with a one-line UserError.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import types
from pathlib import Path

import torch
from torch import Tensor, nn

from ghnq.cli import UserError, run_cli
from ghnq.fileio import atomic_torch_save, torch_load
from ghnq.graph import extract_graph
from ghnq.model import GHNQ, GHNConfig, bits_key, collate

SHIPPED_FORMAT = "ghnq-ghn/1"   # the shippable GHN file (ghnq/assets/ghnq.pt)
ASSET = Path(__file__).resolve().parent / "assets" / "ghnq.pt"


def default_checkpoint() -> Path | None:
    """The shipped checkpoint, or None when this build has none."""
    return ASSET if ASSET.is_file() else None


def state_digest(state: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state_dict (independent of pickle details)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, ghn: GHNQ, meta: dict | None = None) -> Path:
    """The shippable file: config + GHN weights + sha256 + free-form metadata (step, training flags)."""
    state = {k: v.detach().cpu().clone() for k, v in ghn.state_dict().items()}
    return atomic_torch_save(path, {"format": SHIPPED_FORMAT, "config": ghn.config.to_dict(), "state_dict": state,
                                    "sha256": state_digest(state), "meta": meta or {}})


def load_checkpoint(path: str | Path | None = None, device: str = "cpu") -> GHNQ:
    """Load and verify a GHN-Q checkpoint (default: the shipped one)."""
    if path is None:
        path = default_checkpoint()
        if path is None:
            raise UserError(f"no GHN-Q checkpoint shipped ({ASSET} missing); pass --checkpoint FILE")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: GHN-Q checkpoint not found")
    return ghn_from_file_object(torch_load(path, "GHN-Q checkpoint", device), path, device)


def ghn_from_file_object(obj: object, path: Path, device: str = "cpu") -> GHNQ:
    """The verified GHN of a shipped file's loaded contents (format, sha256 of the weights, config)."""
    if not isinstance(obj, dict) or obj.get("format") != SHIPPED_FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path}: not a GHN-Q checkpoint (format {got!r}; expected {SHIPPED_FORMAT!r})")
    state, digest = obj.get("state_dict"), obj.get("sha256")
    if not isinstance(state, dict) or not isinstance(digest, str):
        raise UserError(f"{path}: GHN-Q checkpoint lacks state_dict or sha256")
    actual = state_digest(state)
    if actual != digest:
        raise UserError(f"{path}: GHN-Q checkpoint is corrupt: sha256 of its weights is {actual[:16]}..., "
                        f"its metadata says {digest[:16]}...")
    try:
        config = GHNConfig(**obj.get("config", {}))
        ghn = GHNQ(config)
        ghn.load_state_dict(state)
    except (TypeError, RuntimeError) as err:
        raise UserError(f"{path}: GHN-Q checkpoint does not match this code's model "
                        f"({type(err).__name__}: {str(err)[:160]})") from None
    ghn.meta = obj.get("meta", {})
    return ghn.to(device).eval()


def conditioning(bits: int | str) -> str:
    """The GHN's bit-width conditioning for a target weight width: its own for float, 8, 4 and 2; for a width it
    was not trained on (3, 5, 6, 7), the nearest trained one above it. Measured for 6 on 20 held-out cifar specs
    (benchmarks/bench_ghnq_conditioning.py, step 25649): W6A8 39.27 % with the 8-bit conditioning, 39.07 % with the
    4-bit one (paired +0.21 ± 0.24 pt), W8A8 39.34 %: six bits lose nothing from the 8-bit prediction."""
    text = str(bits).strip().lower()
    if text.isdigit() and 2 <= int(text) <= 8:
        return next(b for b in ("2", "4", "8") if int(b) >= int(text))
    try:
        return bits_key(bits)
    except UserError:
        raise UserError(f"bits: got {bits!r}; allowed: float, or a weight width 2-8 (GHN-Q is conditioned on "
                        "8, 4 and 2; 3 and 5-7 use the nearest above)") from None


@torch.no_grad()
def predict_params(ghn: GHNQ, model: nn.Module, bits: int | str = 8) -> dict[str, Tensor]:
    """{"module.weight": tensor, ...} for every conv/linear parameter of `model` (nothing is modified)."""
    if not getattr(ghn, "meta", {}).get("quant", True):
        bits = "float"  # a GHN trained without quantization only ever saw the float embedding
    graph = extract_graph(model)
    batch = collate([graph], ghn.config.hops).to(next(ghn.parameters()).device)
    return ghn(batch, [conditioning(bits)])[0]


_CACHE: dict[str, GHNQ] = {}


def predict(model: nn.Module, bits: int | str = 8, checkpoint: str | Path | None = None) -> nn.Module:
    """Fill `model`'s parameters in place with GHN-Q's prediction for `bits`; return `model`."""
    path = str(checkpoint) if checkpoint is not None else str(default_checkpoint())
    if path not in _CACHE:
        _CACHE[path] = load_checkpoint(checkpoint)
    params = predict_params(_CACHE[path], model, bits)
    with torch.no_grad():
        named = dict(model.named_parameters())
        for name, value in params.items():
            named[name].copy_(value.to(named[name].device, named[name].dtype))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm):
                if getattr(m, "weight", None) is not None:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                    m.reset_running_stats()
    return model


def main(argv: list[str] | None = None) -> int:
    from ghnq.spec import build_model, load_spec

    ap = argparse.ArgumentParser(prog="python -m ghnq.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", required=True, help="spec.yaml")
    ap.add_argument("--bits", default="8", help="target weight bit width: float or 2-8 (default 8)")
    ap.add_argument("--checkpoint", default=None, help="GHN-Q checkpoint (default: the shipped one)")
    ap.add_argument("--bn-images", type=int, default=512, metavar="N",
                    help="training images to re-estimate BN statistics on before saving (default 512; 0 keeps "
                         "placeholder statistics: mean 0, variance 1)")
    ap.add_argument("--data-root", metavar="DIR", help="CIFAR-10 JPEG root (default: $GHNQ_DATA_ROOT or "
                    "../shared/data/cifar10-jpeg; without one, the embedded sample)")
    ap.add_argument("-o", "--out", required=True, help="output state_dict (.pt)")
    args = ap.parse_args(argv)
    conditioning(args.bits)
    if args.bn_images < 0:
        raise UserError(f"--bn-images: got {args.bn_images}; allowed: 0 or more")
    if args.data_root is not None and not Path(args.data_root).exists():
        raise UserError(f"--data-root {args.data_root}: no such folder or packed file")
    spec = load_spec(args.arch)
    model = build_model(spec)
    predict(model, bits=args.bits, checkpoint=args.checkpoint)
    bn = "placeholder BN statistics (--bn-images 0: re-estimate them before use)"
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if args.bn_images and has_bn:
        from calibration.bn import recalibrate_bn
        from ghnq.data import fit_images, load_eval_images

        images, _, source = load_eval_images(args.bn_images, args.data_root, split="train", quiet=True)
        recalibrate_bn(model, fit_images(images, spec["input"], f"{args.arch}: input"), progress=False)
        bn = f"BN statistics from {len(images)} training images ({source})"
    atomic_torch_save(args.out, model.state_dict())
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n:,} parameters predicted by GHN-Q for bits={args.bits}"
          + (f"; {bn}" if has_bn else ""), file=sys.stderr)
    return 0


class _CallableModule(types.ModuleType):
    """This module, callable as `predict`. Importing the submodule `ghnq.predict` (which `ghnq.evaluate`,
    `ghnq.weights`, ... do, and `ghnq.predict()` itself does on first use) rebinds the package attribute
    `ghnq.predict` from the function to this module; being callable, `ghnq.predict(model)` keeps working
    however many times and in whatever import order it is reached."""

    def __call__(self, model: nn.Module, bits: int | str = 8, checkpoint: str | Path | None = None) -> nn.Module:
        return predict(model, bits=bits, checkpoint=checkpoint)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    run_cli(main)
