"""Benchmark: the table ops (calibration.qmodel.TABLE_OPS) in both runtimes, on random parameters.

    python -m benchmarks.bench_table_ops [--trials 20] [--seed 0] [--kinds elu,gelu] [--json out/table_ops.json]

For each op kind and each of `--trials` random (input scale, zero point, output scale, zero point) draws (and a
random LeakyReLU slope / ELU, CELU alpha / Softplus beta and threshold / PReLU slope / Hardtanh bounds), one
single-op QuantizedModel is written as a `.tflite` and a `.pte` and run on all 256 input codes: LiteRT (reference
kernels and the default XNNPACK path) and the ExecuTorch XNNPACK runtime.
Counted: codes where a runtime differs from calibration.reference.op_table (the table both writers carry or
compute), and, for scale, codes where the table differs from torch's own float32 evaluation of the function (how
often the "correctly rounded float32" choice of calibration.sim.et_table is visible at all).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calibration.qmodel import TABLE_OPS, Op, QuantizedModel, Tensor
from calibration.reference import op_table
from calibration.sim import table_function
from ghnq.fileio import atomic_write_text


def _draw(rng: np.random.Generator, kind: str) -> tuple[tuple[float, int], tuple[float, int], dict]:
    s_in = float(np.float32(np.exp(rng.uniform(np.log(0.005), np.log(0.2)))))
    s_out = float(np.float32(np.exp(rng.uniform(np.log(0.002), np.log(0.1)))))
    attrs = ({"alpha": round(float(rng.uniform(0.01, 0.3)), 3)} if kind == "leaky_relu" else
             {"alpha": round(float(rng.uniform(0.2, 2.0)), 3)} if kind in ("elu", "celu") else
             {"alpha": [round(float(a), 3) for a in rng.uniform(-0.5, 1.5, 1)]} if kind == "prelu" else
             {"min": round(float(rng.uniform(-2.0, 0.0)), 3), "max": round(float(rng.uniform(0.1, 3.0)), 3)}
             if kind == "hardtanh" else
             {"beta": round(float(rng.uniform(0.5, 3.0)), 3), "threshold": round(float(rng.uniform(1.0, 20.0)), 3)}
             if kind == "softplus" else {})
    return (s_in, int(rng.integers(-128, 128))), (s_out, int(rng.integers(-128, 128))), attrs


def _torch_float32_table(kind: str, attrs: dict, qi: tuple[float, int], qo: tuple[float, int]) -> np.ndarray:
    x = (torch.arange(-128, 128, dtype=torch.float32) - qi[1]) * torch.tensor(np.float32(qi[0]))
    y = table_function(kind, attrs)(x) * torch.tensor(np.float32(1) / np.float32(qo[0]))
    return (torch.round(y) + qo[1]).clamp(-128, 127).numpy().astype(np.int8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20, help="random parameter draws per op kind (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(TABLE_OPS), help="comma list of op kinds (default: all)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := sorted(set(kinds) - set(TABLE_OPS)):
        p.error(f"--kinds: unknown {', '.join(unknown)}; allowed: {', '.join(TABLE_OPS)}")

    from export.executorch import ExecuTorchRunner, lower
    from export.tflite import KERNELS, LiteRTRunner, build_tflite

    rng = np.random.default_rng(args.seed)
    x = np.arange(-128, 128, dtype=np.int8).reshape(1, 16, 16, 1)
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            row = {"kind": kind, "programs": 0, "codes": 0, "executorch_diff": 0, "delegated": 0,
                   **{f"litert_{k}_diff": 0 for k in KERNELS}, "table_vs_torch_float32": 0}
            for _ in range(args.trials):
                qi, qo, attrs = _draw(rng, kind)
                t = {n: Tensor(n, [1, 16, 16, 1], "int8", np.array([s], np.float32), np.array([zp]))
                     for n, (s, zp) in (("x", qi), ("y", qo))}
                op = Op(kind, ["x"], ["y"], dict(attrs))
                qm = QuantizedModel([op], t, "x", "y")
                want = op_table(op, qi, qo).ravel()
                prog = lower(qm)
                path = Path(tmp) / "m.pte"
                path.write_bytes(prog.data)
                got = ExecuTorchRunner(path)(x).ravel()
                row["executorch_diff"] += int((got != want).sum())
                row["delegated"] += int(not prog.delegation["outside_delegate"])
                data = build_tflite(qm)
                for k in KERNELS:
                    row[f"litert_{k}_diff"] += int((LiteRTRunner(data, k).run_named({"x": x}).ravel() != want).sum())
                row["table_vs_torch_float32"] += int((_torch_float32_table(kind, attrs, qi, qo) != want).sum())
                row["programs"] += 1
                row["codes"] += 256
            rows.append(row)
            print(f"{kind}: {row}", flush=True)
    cols = ["kind", "programs", "codes", "delegated", "executorch_diff", *[f"litert_{k}_diff" for k in KERNELS],
            "table_vs_torch_float32"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"\n{time.perf_counter() - t0:.0f} s, seed {args.seed}, torch {torch.__version__}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"seed": args.seed, "trials": args.trials, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
