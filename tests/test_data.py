"""CIFAR-10 loading: decode once, cache keyed by the file list, embedded-sample fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ghnq.cli import UserError
from ghnq.data import (
    CLASSES,
    SAMPLE_PATH,
    default_data_root,
    fit_images,
    interleaved_order,
    load_cifar10,
    load_eval_images,
)


def _make_folder(root: Path, per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.png")


def test_decode_cache_and_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GHNQ_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    _make_folder(root)
    x, y = load_cifar10("test", root, progress=False)
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8
    assert list(y) == [c for c in range(10) for _ in range(2)]  # alphabetical class order = labels
    assert np.array_equal(x[0], np.asarray(Image.open(root / "test" / "airplane" / "0.png")))
    caches = list((tmp_path / "cache").glob("*.npz"))
    assert len(caches) == 1
    # A changed folder (one more image) is decoded again, under a new key.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "test" / "truck" / "9.png")
    x2, y2 = load_cifar10("test", root, progress=False)
    assert len(x2) == 21 and y2[-1] == 9
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    assert not list((tmp_path / "cache").glob(".*tmp"))  # atomic: no temp files left


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data folder not found"):
        load_cifar10("train", tmp_path / "nowhere")
    (tmp_path / "d" / "train" / "airplane").mkdir(parents=True)
    with pytest.raises(UserError, match="class folder 'automobile' missing"):
        load_cifar10("train", tmp_path / "d")


def test_unreadable_or_odd_sized_image_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A corrupt file or one image of another size in a user's data folder: one error naming the file, no cache."""
    monkeypatch.setenv("GHNQ_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    _make_folder(root, per_class=1)
    bad = root / "test" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(UserError, match=rf"^{bad}: not a readable image"):
        load_cifar10("test", root, progress=False)
    bad.unlink()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(root / "test" / "cat" / "wide.png")
    with pytest.raises(UserError, match=r"wide.png: 64×48 pixels, but .*airplane/0.png is 32×32"):
        load_cifar10("test", root, progress=False)
    assert not list((tmp_path / "cache").glob("*.npz"))
    # all images of one (non-CIFAR) size are fine: the models' input size is the spec's business (fit_images)
    x, _ = load_cifar10("train", root, progress=False)
    assert x.shape == (10, 32, 32, 3)


def test_embedded_sample_fallback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert SAMPLE_PATH.stat().st_size <= 2_000_000
    x, y, source = load_eval_images(100, root=tmp_path / "no-data")
    assert "embedded sample" in source and "embedded sample" in capsys.readouterr().err
    assert x.shape == (100, 32, 32, 3) and np.bincount(y, minlength=10).tolist() == [10] * 10


@pytest.mark.skipif(not (default_data_root() / "test").is_dir(), reason="CIFAR-10 JPEG folder not present")
def test_real_cifar10_test_split() -> None:
    x, y = load_cifar10("test")
    assert x.shape == (10000, 32, 32, 3) and np.bincount(y).tolist() == [1000] * 10
    sample_x, sample_y = np.load(SAMPLE_PATH)["images"], np.load(SAMPLE_PATH)["labels"]
    idx = np.sort(interleaved_order(y)[:512])
    assert np.array_equal(sample_x, x[idx]) and np.array_equal(sample_y, y[idx])  # the sample is real test data


def test_fit_images_resizes_to_the_declared_input_and_refuses_other_channel_counts() -> None:
    """A spec's declared input size is what the model sees: same size → the very array; another H×W → resized
    uint8 (a flat image stays flat, a left/right split stays split, numpy in → numpy out); another channel count
    → one clear error naming the key."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert fit_images(images, [3, 32, 32], "s.yaml: input") is images
    out = fit_images(images, [3, 48, 20], "s.yaml: input")
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (3, 48, 20, 3)
    flat = np.full((2, 32, 32, 3), 77, np.uint8)
    assert (fit_images(flat, (3, 9, 9), "w") == 77).all() and (fit_images(flat, (3, 64, 64), "w") == 77).all()
    halves = np.zeros((1, 32, 32, 3), np.uint8)
    halves[:, :, 16:] = 255
    small = fit_images(torch.from_numpy(halves), (3, 16, 16), "w")
    assert isinstance(small, torch.Tensor) and (small[0, :, :7] == 0).all() and (small[0, :, 9:] == 255).all()
    with pytest.raises(UserError, match=r"^s\.yaml: input: 1 channel\(s\); .*allowed here: 3$"):
        fit_images(images, [1, 28, 28], "s.yaml: input")
