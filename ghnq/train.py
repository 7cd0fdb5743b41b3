"""SGD baseline trainer: the reference numbers GHN-Q and the low-bit search are compared with.

    python -m ghnq.train --arch specs/resnet20.yaml --epochs 30
    python -m ghnq.train --arch specs/resnet20.yaml --epochs 30 --resume   # after any stop, kill -9 included

Standard CIFAR-10 recipe: random crop (pad 4) + horizontal flip, SGD with Nesterov momentum 0.9, weight
decay 5e-4, cosine learning rate per step. The checkpoint (`OUT/checkpoint.pt`, written atomically every
`--checkpoint-every` seconds and at each epoch end) holds model, optimizer and position; the batch order
and augmentation are pure functions of (seed, epoch, step), so a resumed run draws exactly the batches the
stopped one would have. `OUT/weights.pt` is the final float state_dict (`--weights` of calibration/export).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ghnq.cli import UserError, run_cli
from ghnq.data import check_channels, check_labels, fit_images, interleaved_order, load_cifar10, to_float
from ghnq.fileio import atomic_torch_save, atomic_write_text, torch_load
from ghnq.spec import build_model, load_spec, spec_name


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip, on a uint8 NHWC batch."""
    n, h, w, _ = images.shape
    padded = F.pad(images.permute(0, 3, 1, 2), (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, 3, h, w + 8)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, 3, h, w)
    out = padded.gather(2, rows).gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out.permute(0, 2, 3, 1)


def balanced_subset(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n of the class-interleaved order. Why not images[:n]: the data folders are class-sorted, so a
    plain prefix of 25,000 training images holds 5 of the 10 classes (and 2,000 test images, 2)."""
    keep = interleaved_order(labels)[:n]
    return images[keep], labels[keep]


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 500,
             device: str = "cpu") -> float:
    """Top-1 accuracy (0..1) of a float model on uint8 NHWC images."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size]).to(device)
        pred = model(x).argmax(1).cpu().numpy()
        correct += int((pred == labels[i:i + batch_size]).sum())
    return correct / max(1, len(images))


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a float state_dict (or a trainer checkpoint holding one) into `model`, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    obj = torch_load(path, "weights file")
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: holds no state_dict (expected a dict of tensors, or a checkpoint with 'model')")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise UserError(f"{path}: weights do not fit this architecture: {'; '.join(parts)}")
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{path}: tensor {k} holds NaN or Inf")
    model.load_state_dict(state)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ghnq.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, help="spec.yaml to train")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (cosine decay to 0)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--data-root", default=None, help="CIFAR-10 JPEG root (default: $GHNQ_DATA_ROOT or "
                   "../shared/data/cifar10-jpeg)")
    p.add_argument("--out", default=None, help="run folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--train-images", type=int, default=None, help="use N training images (class-balanced)")
    p.add_argument("--eval-images", type=int, default=None, help="evaluate on N test images (class-balanced)")
    p.add_argument("--checkpoint-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise UserError("--epochs, --batch-size must be >= 1 and --lr > 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = load_spec(args.arch)
    check_channels(spec["input"][0], f"{args.arch}: input")
    check_labels(spec["num_classes"], f"{args.arch}: num_classes")
    out = Path(args.out or Path("runs") / spec_name(spec))
    ckpt_path = out / "checkpoint.pt"
    torch.manual_seed(args.seed)
    model = build_model(spec).to(args.device).to(memory_format=torch.channels_last)
    x_train, y_train = load_cifar10("train", args.data_root)
    x_test, y_test = load_cifar10("test", args.data_root)
    if args.train_images:
        x_train, y_train = balanced_subset(x_train, y_train, args.train_images)
    if args.eval_images:
        x_test, y_test = balanced_subset(x_test, y_test, args.eval_images)
    x_test = fit_images(x_test, spec["input"], f"{args.arch}: input")
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim > 1]
    no_decay = [p_ for n, p_ in model.named_parameters() if p_.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    step, history = 0, []
    if args.resume:
        if not ckpt_path.is_file():
            raise UserError(f"{ckpt_path}: no checkpoint to resume from")
        ck = torch.load(ckpt_path, map_location=args.device, weights_only=False)
        if ck["spec"] != spec or ck["total_steps"] != total_steps:
            raise UserError(f"{ckpt_path}: checkpoint is for another spec or schedule; use another --out")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, history = ck["step"], ck["history"]
        print(f"resumed at step {step}/{total_steps} (epoch {step // steps_per_epoch + 1})")

    def save() -> None:
        atomic_torch_save(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                      "scheduler": sched.state_dict(), "step": step, "total_steps": total_steps,
                                      "spec": spec, "history": history, "args": vars(args)})

    from tqdm import tqdm

    x_train_t, y_train_t = torch.from_numpy(x_train), torch.from_numpy(y_train)
    last_save = time.monotonic()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {spec_name(spec)}", unit="step", mininterval=2.0)
    t_epoch = time.monotonic()
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        perm = torch.from_numpy(np.random.default_rng([args.seed, epoch]).permutation(len(x_train)))
        idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x = fit_images(augment(x_train_t[idx], gen), spec["input"], f"{args.arch}: input")
        x = to_float(x).to(args.device).contiguous(memory_format=torch.channels_last)
        model.train()
        loss = F.cross_entropy(model(x), y_train_t[idx].to(args.device))
        if not torch.isfinite(loss):
            raise UserError(f"loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
        if step % steps_per_epoch == 0:
            acc = evaluate(model, x_test, y_test, device=args.device)
            secs = time.monotonic() - t_epoch
            history.append({"epoch": step // steps_per_epoch, "step": step, "loss": loss.item(),
                            "test_top1": acc, "epoch_seconds": secs})
            bar.write(f"epoch {step // steps_per_epoch}: test top-1 {acc:.4f} ({len(x_test)} images), "
                      f"{secs:.0f} s")
            t_epoch = time.monotonic()
            save()
            last_save = time.monotonic()
        elif time.monotonic() - last_save > args.checkpoint_every:
            save()
            last_save = time.monotonic()
    bar.close()
    acc = evaluate(model, x_test, y_test, device=args.device)
    atomic_torch_save(out / "weights.pt", {k: v.cpu() for k, v in model.state_dict().items()})
    atomic_write_text(out / "result.json", json.dumps({"spec": spec_name(spec), "test_top1": acc,
                                                       "test_images": len(x_test), "epochs": args.epochs,
                                                       "history": history}, indent=2))
    print(f"test top-1 {acc:.4f} on {len(x_test)} images; weights: {out / 'weights.pt'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
