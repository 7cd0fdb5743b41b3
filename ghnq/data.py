"""CIFAR-10 from JPEG folders, decoded once into a cached uint8 array; and the embedded sample.

Layout: ROOT/{train,test}/<class>/*.jpg, classes in alphabetical order = the standard CIFAR-10 labels.
The root is `--data-root` / `$GHNQ_DATA_ROOT`, defaulting to `../shared/data/cifar10-jpeg` beside the
project. The decoded arrays are cached under `$GHNQ_CACHE` (default `~/.cache/ghnq`), keyed by a hash of
the folder's file list (names and sizes), so a changed folder is decoded again. Images are uint8 NHWC.

The root may also be one packed file (`python -m scripts.pack_data`: the JPEG bytes of each split in one .npz,
~46 MB for the training split) for machines that receive the project as a size-capped copy; it is decoded on
arrival into the same cache.

When no data root exists, `load_eval_images` falls back to the embedded sample shipped in the package
(512 test images) and says so: calibration, export and verification then still work on real images.

A spec may declare another input size than CIFAR-10's 32×32 (`input: [3, H, W]`): `fit_images` resizes the
images to it, so calibration, the artifact's input tensor and verification all have the size the spec declares.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ghnq.cli import UserError
from ghnq.fileio import atomic_write

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the CIFAR-10 training set (pixels in [0, 1]); models see (x - MEAN) / STD.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PATH = Path(__file__).resolve().parent / "assets" / "cifar10_test_sample.npz"


def default_data_root() -> Path:
    env = os.environ.get("GHNQ_DATA_ROOT")
    if env:
        return Path(env)
    return PROJECT_ROOT.parent / "shared" / "data" / "cifar10-jpeg"


def cache_dir() -> Path:
    return Path(os.environ.get("GHNQ_CACHE", Path.home() / ".cache" / "ghnq"))


def _list_files(split_dir: Path) -> list[tuple[int, Path]]:
    files = []
    for label, cls in enumerate(CLASSES):
        folder = split_dir / cls
        if not folder.is_dir():
            raise UserError(f"{split_dir}: class folder '{cls}' missing; expected one folder per class: "
                            f"{', '.join(CLASSES)}")
        files += [(label, p) for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    if not files:
        raise UserError(f"{split_dir}: no images found")
    return files


def _decode(source: Path | bytes, where: str) -> np.ndarray:
    """One image file (a path, or its bytes from a pack) → uint8 RGB [H, W, 3]."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated / unreadable files
        raise UserError(f"{where}: not a readable image ({err})") from None


def _stack(images: list[np.ndarray], names: list[str]) -> np.ndarray:
    """One array for the split; every image must have the first one's size (models take a fixed input)."""
    first = images[0].shape
    for img, name in zip(images, names, strict=True):
        if img.shape != first:
            raise UserError(f"{name}: {img.shape[1]}×{img.shape[0]} pixels, but {names[0]} is "
                            f"{first[1]}×{first[0]}; allowed: every image of a split the same size")
    return np.stack(images)


def load_cifar10(split: str, root: str | os.PathLike | None = None, progress: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """All images of a split as (uint8 [N, H, W, 3], int64 [N]); decoded once, then read from the cache."""
    if split not in ("train", "test"):
        raise UserError(f"split: got {split!r}; allowed: train, test")
    root = Path(root) if root is not None else default_data_root()
    if root.is_file():
        return _load_packed(root, split, progress)
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(f"{split_dir}: data folder not found; set --data-root or GHNQ_DATA_ROOT to a folder "
                        "holding train/ and test/ with one sub-folder per class")
    files = _list_files(split_dir)
    key = hashlib.sha256()
    for label, p in files:
        key.update(f"{label}/{p.name}/{p.stat().st_size}\n".encode())
    cache = cache_dir() / f"cifar10-{split}-{key.hexdigest()[:16]}.npz"
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    from tqdm import tqdm

    images = _stack([_decode(p, str(p)) for _, p in tqdm(files, desc=f"decoding CIFAR-10 {split}", unit="img",
                                                          disable=not progress, mininterval=1.0)],
                    [str(p) for _, p in files])
    labels = np.array([label for label, _ in files], dtype=np.int64)

    def write(f: io.BufferedWriter) -> None:
        np.savez(f, images=images, labels=labels)

    atomic_write(cache, write)
    return images, labels


PACK_FORMAT = "ghnq-cifar10-jpeg/1"


def _read_cache(cache: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Decoded images from the cache, or None when absent or damaged (then decoded again)."""
    if cache.exists():
        try:
            with np.load(cache) as z:
                return z["images"], z["labels"]
        except (OSError, ValueError, KeyError):
            pass
    return None


def _load_packed(pack: Path, split: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """A split of a packed file (scripts/pack_data.py), decoded once into the cache keyed by the pack's hash."""
    from ghnq.fileio import sha256_file

    cache = cache_dir() / f"cifar10-{split}-pack-{sha256_file(pack)[:16]}.npz"
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    try:
        with np.load(pack) as z:
            if str(z["format"]) != PACK_FORMAT:
                raise UserError(f"{pack}: format {str(z['format'])!r}; expected {PACK_FORMAT!r}")
            blob, offsets, labels = z[f"{split}_jpeg"], z[f"{split}_offsets"], z[f"{split}_labels"]
    except KeyError as err:
        raise UserError(f"{pack}: no {err.args[0]!r} array; this pack holds no '{split}' split "
                        "(make it with python -m scripts.pack_data --splits train,test)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{pack}: not a readable packed CIFAR-10 file ({err})") from None
    from tqdm import tqdm

    names = [f"{pack}: {split} image {i}" for i in range(len(labels))]
    images = _stack([_decode(blob[offsets[i]:offsets[i + 1]].tobytes(), names[i])
                     for i in tqdm(range(len(labels)), desc=f"decoding packed CIFAR-10 {split}", unit="img",
                                   disable=not progress, mininterval=1.0)], names)
    atomic_write(cache, lambda f: np.savez(f, images=images, labels=labels))
    return images, labels


def load_sample() -> tuple[np.ndarray, np.ndarray]:
    """The embedded sample: 512 CIFAR-10 test images shipped with the package."""
    with np.load(SAMPLE_PATH) as z:
        return z["images"], z["labels"]


def load_eval_images(n: int | None = None, root: str | os.PathLike | None = None, split: str = "test",
                     quiet: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """Up to `n` real images for calibration/verification: the data root when it exists, else the sample.

    Returns (images, labels, source) where source says where they came from (for reports).
    The subset is the first `n` of a fixed class-interleaved order, so it is balanced and repeatable.
    """
    root = Path(root) if root is not None else default_data_root()
    if root.is_file() or (root / split).is_dir():
        images, labels = load_cifar10(split, root, progress=not quiet)
        source = f"{root}:{split}" if root.is_file() else f"{root / split}"
    else:
        if not quiet:
            print(f"note: no CIFAR-10 data at {root / split}; using the embedded sample of "
                  f"{len(load_sample()[1])} test images", file=sys.stderr)
        images, labels = load_sample()
        source = "embedded sample (ghnq/assets/cifar10_test_sample.npz)"
    order = interleaved_order(labels)
    if n is not None:
        order = order[:n]
    return images[order], labels[order], source


def check_labels(num_classes: int, where: str) -> None:
    """A model trained on these labels needs an output for each of CIFAR-10's classes."""
    if num_classes < len(CLASSES):
        raise UserError(f"{where}: {num_classes}; the training labels are CIFAR-10's {len(CLASSES)} classes, so "
                        f"allowed here: {len(CLASSES)} or more")


def check_channels(channels: int, where: str) -> None:
    if channels != len(MEAN):
        raise UserError(f"{where}: {channels} channel(s); the calibration and test data are RGB CIFAR-10 images, "
                        f"so allowed here: {len(MEAN)}")


def fit_images(images: np.ndarray | torch.Tensor, input_chw: list[int] | tuple[int, ...], where: str
               ) -> np.ndarray | torch.Tensor:
    """uint8 NHWC images as a model declaring `input_chw` takes them: resized to its H×W when that differs.

    Bilinear with antialiasing (what torchvision's Resize does on tensors), rounded back to uint8, so the
    resized images stay pixel data and the artifact's uint8/int8 input quantization is unchanged. The data is
    RGB, so a model declaring another channel count cannot take it: a UserError naming `where` (the spec file's
    input key) says so. Returns the same type it was given.
    """
    c, h, w = (int(v) for v in input_chw)
    check_channels(c, where)
    if tuple(images.shape[1:3]) == (h, w):
        return images
    x = torch.as_tensor(images)
    out = torch.empty((len(x), h, w, c), dtype=torch.uint8)
    for i in range(0, len(x), 256):  # chunks: a large set resized at once would hold it all as float32
        chunk = x[i:i + 256].permute(0, 3, 1, 2).float()
        y = torch.nn.functional.interpolate(chunk, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out[i:i + 256] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out if isinstance(images, torch.Tensor) else out.numpy()


def interleaved_order(labels: np.ndarray) -> np.ndarray:
    """Indices taking one image of each class in turn: any prefix is class-balanced."""
    per_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    rank = np.empty(len(labels), dtype=np.int64)
    for idx in per_class:
        rank[idx] = np.arange(len(idx))
    return np.lexsort((labels, rank))


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC → normalized float32 NCHW, the input every model in this toolkit takes.

    Contiguous NCHW, as any nn.Module expects: the permuted NHWC strides (channels-last) are ~25 % faster for
    convs on CPU but break a user's `x.view(x.size(0), -1)`. Hot loops over spec nets convert on their own.
    """
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
