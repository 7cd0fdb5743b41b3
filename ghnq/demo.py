"""`make demo`: the toolkit's main command on the tiny MobileNetV2-like spec, with every default.

    python -m ghnq.demo [--out DIR] [--verify-images N]

Runs `python -m export.tflite --arch specs/tiny-mbv2.yaml`: weights from the shipped GHN-Q checkpoint (else
a seeded random init, with a warning), calibration and verification on CIFAR-10 when the data root exists,
else on the embedded 512-image sample — so it works on a fresh machine with no data. Prints where the
artifacts and the report are; the exit code is export.tflite's (0 verified, 1 verification failed, 2 bad input).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ghnq.cli import run_cli

SPEC = Path(__file__).resolve().parents[1] / "specs" / "tiny-mbv2.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ghnq.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/tiny-mbv2", metavar="DIR", help="output folder (default out/tiny-mbv2)")
    p.add_argument("--verify-images", type=int, default=1000, metavar="N", help="test images to verify on (1000)")
    args = p.parse_args(argv)
    from export import tflite

    print(f"ghnq demo: exporting {SPEC.relative_to(SPEC.parents[1])} to integer-only int8 TFLite and verifying it")
    code = tflite.main(["--arch", str(SPEC), "--out", args.out, "--verify-images", str(args.verify_images)])
    out = Path(args.out)
    print(f"\nartifacts: {out / 'tiny-mbv2_int8.tflite'}, {out / 'tiny-mbv2_fp32.tflite'}\n"
          f"report:    {out / 'report.md'} (+ report.json, plots, verify/ for `python -m devices.bundle {out}`)")
    return code


if __name__ == "__main__":
    run_cli(main)
