"""Pack CIFAR-10 JPEG folders into one file, to travel where only the project checkout goes (a GPU machine).

    python -m scripts.pack_data -o packed/cifar10.npz                 # train + test from the default root
    python -m scripts.pack_data --splits train -o packed/train.npz    # ≈ 46 MB: the JPEG bytes, not pixels
    python -m ghnq.meta_train --data-root packed/cifar10.npz ...      # any --data-root accepts the file

The file holds each split's JPEG files byte for byte (concatenated, with offsets) and their labels, so the
images decoded from it equal the folder's exactly; `ghnq.data` decodes it on arrival into its cache.
`packed/` is git-ignored: data is never committed.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from ghnq.cli import UserError, run_cli
from ghnq.data import PACK_FORMAT, _list_files, default_data_root
from ghnq.fileio import atomic_write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.pack_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="CIFAR-10 JPEG root with train/ and test/ (default: the data root)")
    ap.add_argument("--splits", default="train,test", help="comma list of splits to pack")
    ap.add_argument("-o", "--out", required=True, help="output .npz file")
    args = ap.parse_args(argv)
    root = Path(args.root) if args.root else default_data_root()
    arrays: dict[str, np.ndarray] = {"format": np.array(PACK_FORMAT)}
    for split in args.splits.split(","):
        if split not in ("train", "test"):
            raise UserError(f"--splits: got {split!r}; allowed: train, test")
        if not (root / split).is_dir():
            raise UserError(f"{root / split}: data folder not found (--root)")
        files = _list_files(root / split)
        blobs = [p.read_bytes() for _, p in files]
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        arrays[f"{split}_labels"] = np.array([label for label, _ in files], dtype=np.int64)
        print(f"{split}: {len(files)} images, {len(arrays[f'{split}_jpeg']) / 1e6:.1f} MB of JPEG", file=sys.stderr)
    out = Path(args.out)

    def write(f: io.BufferedWriter) -> None:
        np.savez(f, **arrays)  # uncompressed: JPEG bytes do not compress further

    atomic_write(out, write)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    run_cli(main)
