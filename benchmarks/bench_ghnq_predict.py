"""GHN-Q prediction time per network and peak memory, on this CPU.

    .venv/bin/python benchmarks/bench_ghnq_predict.py [--checkpoint FILE] [--repeat 20] [--threads 1]

Time: median wall time and median process CPU time (1 thread: the wall time on an idle core; this
machine is shared, so wall times carry other jobs' load) of `ghnq.predict(model, bits=8)` on an
already-built model, checkpoint loaded (first call excluded): torch.fx trace + graph + GHN forward +
copy into the module. Broken down (CPU time) into trace+graph, collate (shortest paths, levels) and the
GHN forward. Memory: peak RSS of a fresh process
that imports torch, loads the checkpoint and predicts ResNet-20 (a whole-process upper bound), next to
the same process's RSS before predicting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ghnq.graph import extract_graph  # noqa: E402
from ghnq.model import collate  # noqa: E402
from ghnq.predict import default_checkpoint, load_checkpoint, predict  # noqa: E402
from ghnq.spec import build_model, load_spec  # noqa: E402


def peak_memory(ckpt: str) -> dict:
    spec = str(ROOT / "specs/resnet20.yaml")
    code = (
        f"import resource,sys,torch; sys.path.insert(0, {str(ROOT)!r})\n"
        "from ghnq.predict import predict, load_checkpoint\n"
        "from ghnq.spec import build_model, load_spec\n"
        f"m = build_model(load_spec({spec!r})); load_checkpoint({ckpt!r})\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"predict(m, bits=8, checkpoint={ckpt!r})\n"
        "print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"rss_before_predict_mb": int(out[0]) / 1024, "peak_rss_mb": int(out[1]) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = args.checkpoint or str(default_checkpoint())
    ghn = load_checkpoint(ckpt)
    print(f"# torch {torch.__version__}, {args.threads} thread(s), checkpoint {ckpt}")
    for spec_path in sorted((ROOT / "specs").glob("*.yaml")):
        model = build_model(load_spec(spec_path))
        predict(model, bits=8, checkpoint=ckpt)  # warm-up (and checkpoint cache)
        total, cpu, graph_t, coll_t, ghn_t = [], [], [], [], []
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            predict(model, bits=8, checkpoint=ckpt)
            total.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            t0 = time.process_time()
            g = extract_graph(model)
            t1 = time.process_time()
            b = collate([g], ghn.config.hops)
            t2 = time.process_time()
            with torch.no_grad():
                ghn(b, ["8"])
            t3 = time.process_time()
            graph_t.append(t1 - t0)
            coll_t.append(t2 - t1)
            ghn_t.append(t3 - t2)
        n_params = sum(p.numel() for p in model.parameters())
        print(json.dumps({"spec": spec_path.stem, "params": n_params, "nodes": len(g.nodes),
                          "predict_wall_ms": round(1e3 * statistics.median(total), 1),
                          "predict_cpu_ms": round(1e3 * statistics.median(cpu), 1),
                          "trace_graph_ms": round(1e3 * statistics.median(graph_t), 1),
                          "collate_ms": round(1e3 * statistics.median(coll_t), 1),
                          "ghn_forward_ms": round(1e3 * statistics.median(ghn_t), 1)}))
    print(json.dumps({"memory_resnet20": peak_memory(ckpt)}))
    print(f"# load average while measuring: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
