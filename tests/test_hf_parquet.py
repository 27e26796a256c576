"""Hugging Face parquet images of any size (issue 26): JPEG classification rows cut for training and
evaluation, a corrupt row refused in one line naming it, and VOC-style image + PNG mask rows with 255 kept."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fedcsg.data.hf_parquet import read_classification, read_voc

SIZES = [(64, 48), (33, 90), (200, 120), (40, 40)]  # width x height, none of them the crop size


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write(path: Path, columns: dict[str, list]) -> Path:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    arrays = {
        name: pa.array(values, type=image_type) if name != "label" else pa.array(values, pa.int64())
        for name, values in columns.items()
    }
    pq.write_table(pa.table(arrays), path)
    return path


def voc_png(mask: np.ndarray) -> bytes:
    """A palette PNG as VOC ships its masks: the pixel values are palette indices, i.e. class ids."""
    image = Image.fromarray(mask, mode="P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    return encoded(image, "PNG")


def jpeg_rows(rng: np.random.Generator) -> list[dict]:
    return [
        {"bytes": encoded(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "JPEG"), "path": f"{i}.jpg"}
        for i, (w, h) in enumerate(SIZES)
    ]


def test_jpegs_of_varied_sizes_are_cut_to_the_configured_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = write(tmp_path / "train.parquet", {"image": jpeg_rows(rng), "label": [3, 0, 999, 7]})
    images, labels = read_classification(path, 32, train=False)
    assert images.shape == (4, 3, 32, 32) and images.dtype == np.uint8
    assert labels.tolist() == [3, 0, 999, 7]
    # A flat-colour image stays that colour through resize and crop.
    flat = Image.new("RGB", (90, 30), (10, 200, 30))
    write(tmp_path / "flat.parquet", {"image": [{"bytes": encoded(flat, "PNG"), "path": "f.png"}], "label": [1]})
    crop, _ = read_classification(tmp_path / "flat.parquet", 24, train=True, seed=5)
    assert np.array_equal(crop[0], np.broadcast_to(np.array([10, 200, 30], np.uint8)[:, None, None], (3, 24, 24)))
    train, _ = read_classification(path, 32, train=True, seed=1)
    again, _ = read_classification(path, 32, train=True, seed=1)
    other, _ = read_classification(path, 32, train=True, seed=2)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_a_corrupt_image_is_refused_in_one_line_naming_the_row(tmp_path: Path) -> None:
    rows = jpeg_rows(np.random.default_rng(1))
    rows[2] = {"bytes": rows[2]["bytes"][:40], "path": "broken.jpg"}
    path = write(tmp_path / "bad.parquet", {"image": rows, "label": [0, 1, 2, 3]})
    with pytest.raises(ValueError, match=r"bad\.parquet: row 2: image does not decode") as info:
        read_classification(path, 32, train=False)
    assert "\n" not in str(info.value)


def test_voc_rows_keep_255_as_ignore(tmp_path: Path) -> None:
    mask = np.zeros((40, 60), np.uint8)
    mask[:, 30:] = 15
    mask[:, 28:32] = 255  # an object border
    image = Image.new("RGB", (60, 40), (1, 2, 3))
    path = write(
        tmp_path / "val.parquet",
        {
            "image": [{"bytes": encoded(image, "JPEG"), "path": "a.jpg"}],
            "mask": [{"bytes": voc_png(mask), "path": "a.png"}],
        },
    )
    images, masks = read_voc(path, 20)
    assert images.shape == (1, 3, 20, 20) and masks.shape == (1, 20, 20)
    # Shorter side 40 -> 20 (scale 1/2), width 60 -> 30, central 20 columns: source columns 10..49.
    expected = np.asarray(Image.fromarray(mask).resize((30, 20), Image.NEAREST))[:, 5:25]
    assert np.array_equal(masks[0], expected)
    assert set(np.unique(masks)) == {0, 15, 255}
    bad = mask.copy()
    bad[0, 20] = 40  # inside the central crop
    write(
        tmp_path / "bad.parquet",
        {
            "image": [{"bytes": encoded(image, "JPEG"), "path": "a.jpg"}],
            "mask": [{"bytes": voc_png(bad), "path": "a.png"}],
        },
    )
    with pytest.raises(ValueError, match=r"row 0: mask value 40; accepted are classes 0\.\.20 and 255"):
        read_voc(tmp_path / "bad.parquet", 40)
