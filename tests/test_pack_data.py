"""scripts.pack_data: one file carries the JPEG folders; images decoded from it equal the folders' exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ghnq.cli import UserError
from ghnq.data import CLASSES, load_cifar10, load_eval_images
from scripts.pack_data import main as pack


def _jpeg_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 1)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.jpg")


def test_packed_equals_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GHNQ_CACHE", str(tmp_path / "cache"))
    _jpeg_tree(tmp_path / "data")
    assert pack(["--root", str(tmp_path / "data"), "-o", str(tmp_path / "c.npz")]) == 0
    for split in ("train", "test"):
        want_x, want_y = load_cifar10(split, tmp_path / "data", progress=False)
        got_x, got_y = load_cifar10(split, tmp_path / "c.npz", progress=False)
        assert np.array_equal(got_x, want_x) and np.array_equal(got_y, want_y)
    x, y, source = load_eval_images(5, tmp_path / "c.npz", quiet=True)
    assert len(x) == 5 and source.endswith(":test")


def test_pack_without_split_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GHNQ_CACHE", str(tmp_path / "cache"))
    _jpeg_tree(tmp_path / "data")
    pack(["--root", str(tmp_path / "data"), "--splits", "train", "-o", str(tmp_path / "t.npz")])
    with pytest.raises(UserError, match="no 'test' split"):
        load_cifar10("test", tmp_path / "t.npz", progress=False)
    (tmp_path / "junk.npz").write_bytes(b"not a pack")
    with pytest.raises(UserError, match="not a readable packed"):
        load_cifar10("train", tmp_path / "junk.npz", progress=False)
