#!/usr/bin/env python3
"""Evaluate and time a ghnq bundle on this device. One file: Python 3 + numpy + one runtime.

    python3 eval.py [BUNDLE] [--artifact FILE] [--threads N] [--out DIR] [--quiet]

Runtimes: `ai_edge_litert` (or `tflite_runtime`) for .tflite, the ExecuTorch Python runtime for .pte.
Nothing else from the toolkit is needed on the device: copy the bundle folder (this script is in it) and run.

What it does, top to bottom:
1. checks every file of the bundle against the sha256 in manifest.json, this script included, and refuses
   a bundle that does not match, naming the file;
2. runs every artifact (or the ones named) on the bundle's int8 eval inputs, one image per invoke (the
   deployed batch size), in chunks; each chunk's outputs are saved atomically under OUT/chunks/, so a run
   killed by a dropped connection continues where it stopped when started again (0 results lost);
3. compares with the simulation's expected int8 outputs: accuracy, top-1 agreement, logit error in int8
   steps (max, p99, mean, worst image); int8 artifacts must stay within the bundle's tolerance;
4. measures latency on one image: warm-up runs, then N timed runs, median / p90 / mean / min in ms;
5. writes OUT/result.json (and OUT/<artifact>.outputs.npy), atomically.

`--quiet`: no progress lines and none of the runtimes' start-up chatter on stderr (shown only when opening an
artifact fails); errors and a failed verification are still printed.

Exit codes: 0 verified, 1 verification failed (the message names the artifact and the mismatch),
2 bad input or a bundle that fails its sha256 check.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

BUNDLE_FORMAT = "ghnq-bundle/1"
RESULT_FORMAT = "ghnq-result/1"
EXIT_MISMATCH, EXIT_BAD = 1, 2


class BundleError(Exception):
    """Bad input: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------
# files: hashes and atomic writes (a killed run never leaves a half-written result or chunk)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_npy(path: str, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


def save_json(path: str, obj: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


# ----------------------------------------------------------------------------------------------------------
# the bundle: manifest + sha256 check


def load_manifest(bundle: str) -> dict:
    path = os.path.join(bundle, "manifest.json")
    if not os.path.isfile(path):
        raise BundleError(f"{path}: no manifest.json (is {bundle!r} a bundle folder made by devices.bundle?)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: key 'format' must be {BUNDLE_FORMAT!r}")
    for key in ("files", "artifacts", "data", "quantization", "tolerance"):
        if key not in manifest:
            raise BundleError(f"{path}: missing key {key!r}")
    return manifest


def verify_bundle(bundle: str, manifest: dict) -> None:
    """Refuse a bundle whose files differ from their manifest sha256, naming the first bad file."""
    for name, entry in sorted(manifest["files"].items()):
        path = os.path.join(bundle, name)
        if os.path.isabs(name) or ".." in name.split("/"):
            raise BundleError(f"manifest.json: file name {name!r} leaves the bundle folder")
        if not os.path.isfile(path):
            raise BundleError(f"bundle file {name!r} is missing ({path}): refusing an incomplete bundle")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise BundleError(f"bundle file {name!r} fails its sha256 check (manifest {entry['sha256'][:16]}…, "
                              f"file {digest[:16]}…): refusing a tampered or corrupted bundle")


# ----------------------------------------------------------------------------------------------------------
# runtimes: one small class per format, same three members (input_spec, output_spec, run)


class TFLiteModel:
    """A .tflite model in LiteRT (ai_edge_litert) or tflite_runtime, default CPU kernels (XNNPACK)."""

    def __init__(self, path: str, threads: int):
        try:
            import ai_edge_litert as rt
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            try:
                import tflite_runtime as rt
                from tflite_runtime.interpreter import Interpreter
            except ImportError:
                raise BundleError("no TFLite runtime: pip install ai-edge-litert (or tflite-runtime)") from None
        self.runtime = f"{rt.__name__} {getattr(rt, '__version__', '?')}"
        self.interpreter = Interpreter(model_path=path, num_threads=threads)
        self.interpreter.allocate_tensors()
        inp, out = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inp) != 1 or len(out) != 1:
            raise BundleError(f"{path}: expected one input and one output, got {len(inp)} and {len(out)}")
        self.inp, self.out = inp[0], out[0]
        self.input_spec = (tuple(int(d) for d in self.inp["shape"]), np.dtype(self.inp["dtype"]),
                           self.inp["quantization"])
        self.output_spec = (tuple(int(d) for d in self.out["shape"]), np.dtype(self.out["dtype"]),
                            self.out["quantization"])

    def run(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.inp["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.out["index"])


class PteModel:
    """An ExecuTorch .pte program's `forward` in the ExecuTorch Python runtime.

    The runtime's Python bindings exchange torch tensors, so this class (only) goes through torch's tensor
    type; eval.py itself computes nothing with torch.
    """

    def __init__(self, path: str, threads: int):
        try:
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime
        except ImportError:
            raise BundleError("no ExecuTorch runtime: pip install executorch (for .pte artifacts)") from None
        from importlib import metadata

        with contextlib.suppress(AttributeError):  # thread pool size: a private hook in executorch 1.x
            portable_lib._unsafe_reset_threadpool(threads)
        try:
            self.runtime = f"executorch {metadata.version('executorch')}"
        except metadata.PackageNotFoundError:
            self.runtime = "executorch ?"
        self.method = Runtime.get().load_program(path).load_method("forward")
        meta = self.method.metadata
        tin, tout = meta.input_tensor_meta(0), meta.output_tensor_meta(0)
        self.input_spec = (tuple(tin.sizes()), _torch_dtype_to_numpy(tin.dtype()), None)
        self.output_spec = (tuple(tout.sizes()), _torch_dtype_to_numpy(tout.dtype()), None)

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        return self.method.execute([torch.from_numpy(np.ascontiguousarray(x))])[0].numpy()


def _torch_dtype_to_numpy(code) -> np.dtype:
    # ScalarType codes of the ExecuTorch tensor metadata: 1 int8, 3 int32, 6 float32.
    table = {1: np.int8, 3: np.int32, 6: np.float32}
    value = int(code) if not hasattr(code, "value") else int(code.value)
    if value not in table:
        raise BundleError(f".pte tensor dtype code {value} not supported (int8, int32, float32 are)")
    return np.dtype(table[value])


def open_model(path: str, threads: int):
    if QUIET:
        with _stderr_shown_on_failure():
            return _open_model(path, threads)
    return _open_model(path, threads)


@contextlib.contextmanager
def _stderr_shown_on_failure():
    """Hold what is written to fd 2 (the runtimes' C++ loggers: LiteRT's delegate banner, ExecuTorch's cpuinfo
    probing) and show it only if the block fails. Their Python bindings have no switch for it. (The host's
    ghnq.cli.drop_native_log_lines catches fd 2 the same way; this script runs without the toolkit.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _open_model(path: str, threads: int):
    if path.endswith(".tflite"):
        return TFLiteModel(path, threads)
    if path.endswith(".pte"):
        return PteModel(path, threads)
    raise BundleError(f"{path}: unknown artifact type (.tflite and .pte are supported)")


# ----------------------------------------------------------------------------------------------------------
# data: bundle inputs → the artifact's input tensor, its output → int8 steps of the output quantization


def model_input(x_int8: np.ndarray, model, quant: dict) -> np.ndarray:
    """One int8 image [H, W, C] → the artifact's input tensor (layout and dtype of that artifact)."""
    shape, dtype, _ = model.input_spec
    x = x_int8
    if tuple(shape[1:]) != x.shape and tuple(shape[1:]) == (x.shape[2], x.shape[0], x.shape[1]):
        x = x.transpose(2, 0, 1)  # NCHW artifacts (ExecuTorch) get the same image channel-first
    if dtype == np.int8:
        return x[None]
    # float artifacts see the same numbers the int8 tensor stands for: (q - zp) * scale
    return ((x.astype(np.float32) - quant["zero_point"]) * np.float32(quant["scale"]))[None].astype(dtype)


def output_steps(y: np.ndarray, quant: dict) -> np.ndarray:
    """Artifact output → int8 codes in the bundle's output quantization (round half to even, saturate)."""
    if y.dtype == np.int8:
        return y.reshape(-1)
    q = np.round(y.astype(np.float64).reshape(-1) / quant["scale"]) + quant["zero_point"]
    return np.clip(q, -128, 127).astype(np.int8)


# ----------------------------------------------------------------------------------------------------------
# the evaluation: chunked and resumable


QUIET = False  # --quiet


def progress(msg: str, final: bool = False) -> None:
    """One progress line: rewritten in place on a terminal, one line per update over a pipe (ssh/adb)."""
    if QUIET:
        return
    try:
        if sys.stderr.isatty():
            sys.stderr.write("\r" + msg + ("\n" if final else ""))
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()
    except BrokenPipeError:
        # the connection that started us is gone (ssh/adb dropped): stop; a rerun resumes from the chunks
        os._exit(141)


def run_outputs(model, name: str, inputs: np.ndarray, qin: dict, qout: dict, chunk_dir: str, chunk: int
                ) -> tuple[np.ndarray, int, int]:
    """int8 output codes for every input, computing only the chunks not already saved in chunk_dir."""
    os.makedirs(chunk_dir, exist_ok=True)
    n = len(inputs)
    starts = list(range(0, n, chunk))
    parts, resumed, t0 = [], 0, time.time()
    for k, start in enumerate(starts):
        stop = min(start + chunk, n)
        path = os.path.join(chunk_dir, f"{start:07d}-{stop:07d}.npy")
        if os.path.isfile(path):
            parts.append(np.load(path))
            resumed += 1
            continue
        out = np.stack([output_steps(model.run(model_input(x, model, qin)), qout) for x in inputs[start:stop]])
        save_npy(path, out)
        parts.append(out)
        rate = (stop - starts[resumed] if resumed < len(starts) else stop) / max(time.time() - t0, 1e-9)
        progress(f"{name}: {stop}/{n} images ({100 * stop // n}%), chunk {k + 1}/{len(starts)}, "
                 f"{rate:.0f} img/s" + (f", {resumed} chunks resumed" if resumed else ""))
    return np.concatenate(parts), resumed, len(starts)


def compare(outputs: np.ndarray, expected: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, top-1 agreement and logit error in int8 steps of device outputs vs the sim's."""
    err = np.abs(outputs.astype(np.int32) - expected.astype(np.int32))
    worst = np.unravel_index(int(err.argmax()), err.shape)
    top1, top1_sim = outputs.argmax(1), expected.argmax(1)
    return {
        "images": int(len(outputs)),
        "accuracy": float(np.mean(top1 == labels)),
        "accuracy_sim": float(np.mean(top1_sim == labels)),
        "top1_agreement": float(np.mean(top1 == top1_sim)),
        "top1_disagreements": int(np.sum(top1 != top1_sim)),
        "max_step_error": int(err.max()),
        "p99_step_error": float(np.percentile(err, 99)),
        "mean_step_error": float(err.mean()),
        "differing_codes": int(np.count_nonzero(err)),
        "codes": int(err.size),
        "worst": {"image": int(worst[0]), "class": int(worst[1]), "device": int(outputs[worst]),
                  "expected": int(expected[worst])},
    }


def check(name: str, metrics: dict, tolerance: dict) -> list[str]:
    """The mismatches of an int8 artifact against the bundle's tolerance, as readable sentences."""
    bad = []
    if metrics["max_step_error"] > tolerance["max_step_error"]:
        w = metrics["worst"]
        bad.append(f"{name}: logit error {metrics['max_step_error']} int8 steps > {tolerance['max_step_error']} "
                   f"allowed (image {w['image']}, class {w['class']}: device {w['device']}, expected {w['expected']}; "
                   f"{metrics['differing_codes']} of {metrics['codes']} codes differ)")
    if metrics["top1_agreement"] < tolerance["min_top1_agreement"]:
        bad.append(f"{name}: top-1 agreement with the sim {100 * metrics['top1_agreement']:.2f}% < "
                   f"{100 * tolerance['min_top1_agreement']:.2f}% required "
                   f"({metrics['top1_disagreements']} of {metrics['images']} images differ)")
    return bad


def latency(model, x: np.ndarray, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        model.run(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model.run(x)
        times.append((time.perf_counter() - t) * 1e3)
    t = np.array(times)
    return {"warmup": warmup, "runs": runs, "median": float(np.median(t)), "p90": float(np.percentile(t, 90)),
            "mean": float(t.mean()), "min": float(t.min())}


def device_info() -> dict:
    info = {"machine": platform.machine(), "system": platform.system(), "release": platform.release(),
            "python": platform.python_version(), "cores": os.cpu_count(), "numpy": np.__version__}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "CPU part") and value.strip():
                info.setdefault("cpu", {})[key.strip()] = value.strip()
    return info


@contextlib.contextmanager
def exclusive(out: str):
    """One eval.py per output folder: a rerun waits for a still-running predecessor (e.g. after a drop)."""
    os.makedirs(out, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): nothing to wait for
        yield
        return
    with open(os.path.join(out, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            progress(f"another eval.py is writing {out}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description="Evaluate and time a ghnq bundle on this device (see the docstring).")
    p.add_argument("bundle", nargs="?", default=here, help="bundle folder (default: the folder of this script)")
    p.add_argument("--artifact", action="append", default=None,
                   help="artifact file in the bundle to run (repeatable; default: every artifact)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the runtime (default 1)")
    p.add_argument("--out", default=None, help="folder for result.json, outputs and resume chunks "
                                               "(default: BUNDLE/results)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--chunk", type=int, default=50, help="images per saved chunk (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="latency warm-up runs (default 10)")
    p.add_argument("--runs", type=int, default=50, help="timed latency runs (default 50)")
    p.add_argument("--skip-accuracy", action="store_true", help="latency only (benchmarks)")
    p.add_argument("--skip-latency", action="store_true", help="accuracy and verification only")
    p.add_argument("--quiet", action="store_true", help="no progress; errors and failures only")
    args = p.parse_args(argv)
    for key in ("threads", "chunk", "runs"):
        if getattr(args, key) < 1:
            raise BundleError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0 or (args.limit is not None and args.limit < 1):
        raise BundleError("--warmup must be >= 0 and --limit >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    global QUIET
    args = parse_args(argv)
    QUIET = args.quiet
    bundle = os.path.abspath(args.bundle)
    manifest = load_manifest(bundle)
    verify_bundle(bundle, manifest)
    out = os.path.abspath(args.out or os.path.join(bundle, "results"))
    artifacts = {a["file"]: a for a in manifest["artifacts"]}
    names = args.artifact or list(artifacts)
    for name in names:
        if name not in artifacts:
            raise BundleError(f"--artifact {name!r} is not in the bundle (it has: {', '.join(artifacts)})")

    data = manifest["data"]
    inputs = np.load(os.path.join(bundle, data["inputs"]))
    expected = np.load(os.path.join(bundle, data["expected"]))
    labels = np.load(os.path.join(bundle, data["labels"]))
    if args.limit:
        inputs, expected, labels = inputs[:args.limit], expected[:args.limit], labels[:args.limit]
    qin, qout = manifest["quantization"]["input"], manifest["quantization"]["output"]
    tolerance = manifest["tolerance"]

    result = {"format": RESULT_FORMAT, "bundle": manifest["name"], "manifest_sha256": sha256_file(
        os.path.join(bundle, "manifest.json")), "toolkit": manifest.get("toolkit", {}), "device": device_info(),
        "threads": args.threads, "tolerance": tolerance, "artifacts": {}}
    failures: list[str] = []
    with exclusive(out):
        for name in names:
            entry = artifacts[name]
            path = os.path.join(bundle, name)
            model = open_model(path, args.threads)
            rec = {"precision": entry["precision"], "runtime": model.runtime, "threads": args.threads,
                   "input": {"shape": list(model.input_spec[0]), "dtype": str(model.input_spec[1])},
                   "output": {"shape": list(model.output_spec[0]), "dtype": str(model.output_spec[1])}}
            if entry["precision"] == "int8":
                failures += check_quantization(name, model, qin, qout)
            if not args.skip_accuracy:
                t = time.time()
                # chunks are reused only for the same artifact, inputs, script, limit and chunking
                key = hashlib.sha256(json.dumps([manifest["files"][name]["sha256"],
                                                 manifest["files"][data["inputs"]]["sha256"],
                                                 manifest["files"]["eval.py"]["sha256"], len(inputs), args.chunk
                                                 ]).encode()).hexdigest()[:16]
                key = f"{name}-{key}"
                outs, resumed, chunks = run_outputs(model, name, inputs, qin, qout,
                                                    os.path.join(out, "chunks", key), args.chunk)
                rec.update(compare(outs, expected, labels))
                rec.update({"chunks": chunks, "resumed_chunks": resumed, "eval_seconds": round(time.time() - t, 3),
                            "outputs": f"{name}.outputs.npy"})
                save_npy(os.path.join(out, f"{name}.outputs.npy"), outs)
                if entry["precision"] == "int8":  # fp32 artifacts are reported, not held to int8 tolerance
                    failures += check(name, rec, tolerance)
            if not args.skip_latency:
                progress(f"{name}: latency, {args.warmup} warm-up + {args.runs} runs, {args.threads} thread(s)")
                rec["latency_ms"] = latency(model, model_input(inputs[0], model, qin), args.warmup, args.runs)
            result["artifacts"][name] = rec
            summary = [f"{name} [{model.runtime}, {args.threads} thread(s)]"]
            if "accuracy" in rec:
                summary.append(f"accuracy {100 * rec['accuracy']:.2f}% (sim {100 * rec['accuracy_sim']:.2f}%), "
                               f"top-1 agreement {100 * rec['top1_agreement']:.2f}%, "
                               f"max error {rec['max_step_error']} steps")
            if "latency_ms" in rec:
                summary.append(f"latency median {rec['latency_ms']['median']:.3f} ms, "
                               f"p90 {rec['latency_ms']['p90']:.3f} ms")
            progress("; ".join(summary), final=True)
        result["verified"] = not failures
        result["failures"] = failures
        result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save_json(os.path.join(out, "result.json"), result)
    if failures:
        print("VERIFICATION FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return EXIT_MISMATCH
    if not QUIET:
        print(f"verified: {os.path.join(out, 'result.json')}", file=sys.stderr)
    return 0


def check_quantization(name: str, model, qin: dict, qout: dict) -> list[str]:
    """An int8 artifact must carry the bundle's input/output quantization (one set of parameters)."""
    bad = []
    for side, spec, want in (("input", model.input_spec, qin), ("output", model.output_spec, qout)):
        shape, dtype, quant = spec
        if dtype != np.int8:
            continue  # float I/O (quantize/dequantize inside the artifact): converted by model_input/output_steps
        if quant is None:
            continue  # the runtime does not expose I/O quantization (ExecuTorch); outputs are still compared
        scale, zero_point = float(quant[0]), int(quant[1])
        if zero_point != int(want["zero_point"]) or abs(scale - want["scale"]) > 1e-6 * abs(want["scale"]):
            bad.append(f"{name}: {side} quantization (scale {scale:.9g}, zero point {zero_point}) differs from the "
                       f"bundle's (scale {want['scale']:.9g}, zero point {want['zero_point']})")
    return bad


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD)
    except KeyboardInterrupt:
        print("interrupted (rerun to resume)", file=sys.stderr)
        sys.exit(130)
