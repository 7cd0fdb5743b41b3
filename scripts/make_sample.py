"""Make the embedded sample: the first 512 CIFAR-10 test images in class-interleaved order, as uint8 .npz.

    python -m scripts.make_sample [--data-root ROOT] [-n 512]

The result (ghnq/assets/cifar10_test_sample.npz, ≤ 2 MB) is the only data committed to the repo.
"""

from __future__ import annotations

import argparse
import io

import numpy as np

from ghnq.data import SAMPLE_PATH, interleaved_order, load_cifar10
from ghnq.fileio import atomic_write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("-n", type=int, default=512)
    args = parser.parse_args()
    images, labels = load_cifar10("test", args.data_root)
    idx = np.sort(interleaved_order(labels)[: args.n])

    def write(f: io.BufferedWriter) -> None:
        np.savez_compressed(f, images=images[idx], labels=labels[idx])

    atomic_write(SAMPLE_PATH, write)
    print(f"wrote {SAMPLE_PATH} ({SAMPLE_PATH.stat().st_size / 1e6:.2f} MB, {len(idx)} images)")


if __name__ == "__main__":
    main()
