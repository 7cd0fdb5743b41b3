"""Calibration benchmark: float → W8A8 drop per observer, W4A8 per observer, and sim vs integer-reference parity.

    python benchmarks/bench_calibration.py --arch specs/resnet20.yaml --weights runs/resnet20-sgd/weights.pt \
        --images 10000 --parity-images 10000 --json out.json
    # same numbers, faster: sim on a GPU (float64, exact integer accumulators either way), reference on 16 cores
    python benchmarks/bench_calibration.py ... --device cuda --ref-workers 16

Calibration images come from the CIFAR-10 training split (never the evaluation images); evaluation on the
first --images test images (class-interleaved). For every observer the W8A8 and W4A8 sim top-1 and the drop
from float; for the --parity-methods (W8A8) the sim (TFLite rounding, the default, and the textbook
float-rounding sim for contrast) is compared with the numpy integer reference (calibration/reference.py, the
BUILTIN_REF oracle) logit code by logit code. Prints progress, then markdown tables; --json writes every
number (atomically). --data-npz reads the images from one .npz (written by --save-data-npz) for a machine
without the JPEG tree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration import QuantizedModel, calibrate, reference  # noqa: E402
from calibration.compare import Comparison, compare  # noqa: E402
from calibration.convert import float_graph, fold_input_normalization  # noqa: E402
from calibration.observers import METHODS  # noqa: E402
from calibration.sim import Simulator, run_ops  # noqa: E402
from ghnq.cli import UserError, run_cli  # noqa: E402
from ghnq.data import load_eval_images  # noqa: E402
from ghnq.fileio import atomic_write, atomic_write_text  # noqa: E402
from ghnq.spec import build_model, load_spec, spec_name  # noqa: E402
from ghnq.train import evaluate, load_weights  # noqa: E402


def folded_float_top1(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, device: str = "cpu",
                      batch: int = 500) -> float:
    """Top-1 of the float graph the QM quantizes (BN folded, normalization folded into the first conv)."""
    g = float_graph(model, [3, images.shape[1], images.shape[2]])
    fold_input_normalization(g)
    params = {k: v.to(device) for k, v in g.params.items()}
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = (torch.from_numpy(images[i:i + batch]).to(device).permute(0, 3, 1, 2).float() - 128) / 255
            pred = run_ops(g.ops, g.input, x, params)[g.output].argmax(1).cpu().numpy()
            correct += int((pred == labels[i:i + batch]).sum())
    return correct / len(images)


# ----------------------------------------------------------------------------------------------------
# Integer reference in worker processes: it is numpy on one core per process, so chunks of images run in
# parallel (fork: every worker inherits the QM, only image chunks travel).

_WORKER_QM: QuantizedModel | None = None


def _init_worker(qm: QuantizedModel) -> None:
    global _WORKER_QM
    _WORKER_QM = qm
    try:  # one BLAS thread per process, or N processes × N threads oversubscribe the cores
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def _ref_chunk(args: tuple[int, np.ndarray]) -> tuple[int, np.ndarray]:
    start, images = args
    assert _WORKER_QM is not None
    return start, reference.run(_WORKER_QM, images)


def run_reference(qm: QuantizedModel, images: np.ndarray, workers: int, chunk: int = 250) -> np.ndarray:
    """Integer-reference logit codes of all images, `workers` processes, with a progress line per ~10 %."""
    out = np.empty((len(images), qm.tensors[qm.output].shape[-1]), np.int8)
    jobs = [(i, images[i:i + chunk]) for i in range(0, len(images), chunk)]
    t0, done, next_report = time.time(), 0, 0.1
    if workers <= 1:
        results = (((s, reference.run(qm, x)) for s, x in jobs))
        pool = None
    else:
        pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(qm,))
        results = pool.imap_unordered(_ref_chunk, jobs)
    try:
        for start, codes in results:
            out[start:start + len(codes)] = codes
            done += len(codes)
            if done / len(images) >= next_report or done == len(images):
                el = time.time() - t0
                print(f"    reference {done}/{len(images)} images, {el:.0f} s (~{el / done * (len(images) - done):.0f}"
                      " s left)", flush=True)
                next_report += 0.1
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return out


def _parity(c: Comparison, a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return {"top1_agreement": c.top1_agreement, "logits_within_1": c.logits_within_1,
            "logits_max_abs": c.logits_max_abs, "codes_differ": int((d > 0).sum()), "codes": int(d.size)}


def load_images(a: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str, np.ndarray, str]:
    if a.data_npz:
        p = Path(a.data_npz)
        if not p.is_file():
            raise UserError(f"--data-npz {p}: file not found")
        with np.load(p) as z:
            missing = [k for k in ("test_images", "test_labels", "calib_images") if k not in z]
            if missing:
                raise UserError(f"--data-npz {p}: keys {missing} missing (write it with --save-data-npz)")
            if len(z["test_images"]) < a.images or len(z["calib_images"]) < a.calib_images:
                raise UserError(f"--data-npz {p}: holds {len(z['test_images'])} test / {len(z['calib_images'])} "
                                f"calibration images; asked for {a.images} / {a.calib_images}")
            src = str(z["test_source"]) if "test_source" in z else str(p)
            csrc = str(z["calib_source"]) if "calib_source" in z else str(p)
            return (z["test_images"][:a.images], z["test_labels"][:a.images], src,
                    z["calib_images"][:a.calib_images], csrc)
    test, labels, src = load_eval_images(a.images)
    calib, _, calib_src = load_eval_images(a.calib_images, split="train")
    return test, labels, src, calib, calib_src


def markdown(res: dict) -> str:
    lines = [f"{res['arch']}: float top-1 {res['float_top1']:.4f} (folded graph {res['folded_float_top1']:.4f}), "
             f"{res['test_images']} test images, {res['calib_images']} calibration images", "",
             "| net | config | observer | sim top-1 | drop vs float (pp) | calibrate s | sim s |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {res['arch']} | W{r['weight_bits']}A8 | {r['method']} | {r['sim_top1']:.4f} | "
                     f"{r['drop_pp']:+.2f} | {r['calibrate_s']:.1f} | {r['sim_s']:.1f} |")
    par = [r for r in res["rows"] if "parity" in r]
    if par:
        lines += ["", "| net | config | observer | images | sim rounding | top-1 agreement | logits within 1 step "
                  "| max error (steps) | codes differing | reference top-1 | reference s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in par:
            p = r["parity"]
            for name, key in (("tflite (default)", "tflite"), ("float (textbook)", "float")):
                q = p[key]
                lines.append(f"| {res['arch']} | W{r['weight_bits']}A8 | {r['method']} | {q.get('images', p['images'])}"
                             f" | {name} | "
                             f"{q['top1_agreement']:.2%} | {q['logits_within_1']:.4%} | {q['logits_max_abs']} | "
                             f"{q['codes_differ']:,} / {q['codes']:,} | {p['reference_top1']:.4f} | "
                             f"{p['reference_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True)
    p.add_argument("--weights", required=True, help="float state_dict or trainer checkpoint")
    p.add_argument("--images", type=int, default=10000, help="test images (first N, class-interleaved)")
    p.add_argument("--parity-images", type=int, default=10000, help="images for sim vs reference (may exceed "
                   "--images: the parity observers' sim then runs on these)")
    p.add_argument("--float-parity-images", type=int, default=None, help="images for the float-rounding sim "
                   "contrast (default: --parity-images)")
    p.add_argument("--calib-images", type=int, default=512, help="calibration images (training split)")
    p.add_argument("--methods", default=",".join(METHODS), help="observers run at W8A8")
    p.add_argument("--w4-methods", default=",".join(METHODS), help="observers also run at W4A8 ('' for none)")
    p.add_argument("--parity-methods", default="minmax", help="W8A8 observers compared with the reference")
    p.add_argument("--device", default="cpu", help="sim device (cpu, cuda); the integer reference is numpy")
    p.add_argument("--batch", type=int, default=256, help="sim batch size")
    p.add_argument("--ref-workers", type=int, default=1, help="processes for the integer reference")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--data-npz", default=None, help="read test + calibration images from this .npz")
    p.add_argument("--save-data-npz", default=None, help="write the images used to this .npz (then continue)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    w4 = [m for m in a.w4_methods.split(",") if m]
    parity = [m for m in a.parity_methods.split(",") if m]
    for m in methods + w4 + parity:
        if m not in METHODS:
            raise UserError(f"observer {m!r}: allowed: {', '.join(METHODS)}")
    if not set(parity) <= set(methods):
        raise UserError(f"--parity-methods {parity}: each must also be in --methods {methods}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {a.device}: torch sees no CUDA device")
    torch.set_num_threads(a.threads)
    spec = load_spec(a.arch)
    model = build_model(spec)
    load_weights(model, a.weights)
    model.eval()
    n_eval = a.images
    a.images = max(a.images, a.parity_images)  # load enough for both; top-1 rows use the first n_eval
    all_test, all_labels, src, calib, calib_src = load_images(a)
    test, labels = all_test[:n_eval], all_labels[:n_eval]
    if a.save_data_npz:
        atomic_write(a.save_data_npz, lambda f: np.savez_compressed(
            f, test_images=all_test, test_labels=all_labels, calib_images=calib, test_source=src,
            calib_source=calib_src))
        print(f"wrote {a.save_data_npz}", flush=True)
    res: dict = {"arch": spec_name(spec), "weights": a.weights, "test_images": n_eval, "test_source": src,
                 "calib_images": len(calib), "calib_source": calib_src, "device": a.device,
                 "torch": torch.__version__, "host": platform.node(),
                 "started_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    if a.device != "cpu":
        res["device_name"] = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else a.device
    t0 = time.time()
    # float accuracy on the CPU even with --device cuda: cuDNN's TF32 / reordered float32 sums could flip a
    # borderline argmax, and the float baseline must not depend on where the sim ran
    res["float_top1"] = evaluate(model, test, labels)
    res["folded_float_top1"] = folded_float_top1(model, test, labels)
    print(f"{res['arch']}: float top-1 {res['float_top1']:.4f} (folded graph {res['folded_float_top1']:.4f}) "
          f"on {len(test)} test images ({time.time() - t0:.0f} s); calibration: {len(calib)} train images",
          flush=True)
    configs = [(8, m) for m in methods] + [(4, m) for m in w4]
    for bits, method in configs:
        t0 = time.time()
        qm = calibrate(model, calib, method=method, weight_bits=bits, act_bits=8, progress=False)
        t1 = time.time()
        do_parity = bits == 8 and method in parity and a.parity_images > 0
        codes_all = Simulator(qm, device=a.device).run(all_test[:max(n_eval, a.parity_images)] if do_parity
                                                       else test, batch_size=a.batch)
        codes = codes_all[:n_eval]
        t2 = time.time()
        top1 = float((codes.argmax(1) == labels).mean())
        row = {"weight_bits": bits, "act_bits": 8, "method": method, "sim_top1": top1,
               "drop_pp": 100 * (res["float_top1"] - top1), "calibrate_s": t1 - t0, "sim_s": t2 - t1}
        print(f"  W{bits}A8 {method}: sim top-1 {top1:.4f} (drop {row['drop_pp']:+.2f} pp), calibrate "
              f"{row['calibrate_s']:.1f} s, sim {row['sim_s']:.1f} s", flush=True)
        if do_parity:
            px = all_test[:a.parity_images]
            t3 = time.time()
            ref = run_reference(qm, px, a.ref_workers)
            ref_s = time.time() - t3
            s_tfl = codes_all[:len(px)]
            nf = min(len(px), a.float_parity_images if a.float_parity_images is not None else len(px))
            s_flt = Simulator(qm, device=a.device, rounding="float").run(px[:nf], batch_size=a.batch)
            row["parity"] = {"images": len(px), "reference_s": ref_s, "ref_workers": a.ref_workers,
                             "reference_top1": float((ref.argmax(1) == all_labels[:len(px)]).mean()),
                             "tflite": _parity(compare(s_tfl, ref), s_tfl, ref),
                             "float": {"images": nf, **_parity(compare(s_flt, ref[:nf]), s_flt, ref[:nf])}}
            q = row["parity"]["tflite"]
            print(f"    parity on {len(px)} images: sim (tflite rounding) vs reference top-1 agreement "
                  f"{q['top1_agreement']:.4%}, logits within 1 step {q['logits_within_1']:.4%}, max "
                  f"{q['logits_max_abs']}, {q['codes_differ']} codes differ; float-rounding sim: "
                  f"{row['parity']['float']['top1_agreement']:.4%} / {row['parity']['float']['logits_within_1']:.4%}"
                  f" / max {row['parity']['float']['logits_max_abs']}; reference {ref_s:.0f} s", flush=True)
        res["rows"].append(row)
        if a.json:  # after every configuration: a stopped run keeps what it measured
            atomic_write_text(a.json, json.dumps(res, indent=1))
    res["finished_utc"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    if a.json:
        atomic_write_text(a.json, json.dumps(res, indent=1))
    print()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    run_cli(main)
