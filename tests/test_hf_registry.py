"""The registry's any-size sets (issue 26): imagenet (ILSVRC/imagenet-1k parquet, shards, "test" =
validation) and voc (image + PNG mask, 255 kept) read through load_labels / load_split from parquet
files written here; the image-size setting; no download and a one-line error for a directory
lacking them; the shipped GPU configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fedcsg.data import registry
from fedcsg.data.hf_parquet import classification_image, read_classification, read_voc
from fedcsg.data.readers import ImageData, load_labels, load_split
from fedcsg.spec.config import RunConfig
from fedcsg.spec.experiments import load_experiment

from .test_hf_parquet import encoded, jpeg_rows, voc_png, write


@pytest.fixture
def imagenet_dir(tmp_path: Path) -> Path:
    """imagenet/ with the train split in two shards (4 + 3 rows) and one validation file (2 rows)."""
    folder = tmp_path / "imagenet"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write(folder / "train-00000-of-00002.parquet", {"image": jpeg_rows(rng), "label": [3, 0, 999, 7]})
    write(folder / "train-00001-of-00002.parquet", {"image": jpeg_rows(rng)[:3], "label": [5, 5, 1]})
    write(folder / "validation.parquet", {"image": jpeg_rows(rng)[1:3], "label": [42, 8]})
    return tmp_path


def voc_masks() -> list[np.ndarray]:
    """Three 40x60 masks: mostly class 15 with a 255 border and some class 3 (label 15); background
    and 255 only (label 0); classes 5 and 7 tied (label 5, the smaller)."""
    first = np.zeros((40, 60), np.uint8)
    first[:, 30:] = 15
    first[:, 28:32] = 255
    first[:5, 15:25] = 3  # inside the central crop at every size used here
    second = np.zeros((40, 60), np.uint8)
    second[10:20] = 255
    third = np.zeros((40, 60), np.uint8)
    third[:10, :10], third[20:30, 20:30] = 7, 5
    return [first, second, third]


@pytest.fixture
def voc_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "voc"
    folder.mkdir()
    image = Image.new("RGB", (60, 40), (1, 2, 3))
    rows = {
        "image": [{"bytes": encoded(image, "JPEG"), "path": f"{i}.jpg"} for i in range(3)],
        "mask": [{"bytes": voc_png(mask), "path": f"{i}.png"} for i, mask in enumerate(voc_masks())],
    }
    write(folder / "train.parquet", rows)
    write(folder / "validation-00000-of-00001.parquet", {name: values[::-1] for name, values in rows.items()})
    return tmp_path


def test_imagenet_labels_span_the_shards_and_test_is_validation(imagenet_dir: Path) -> None:
    assert load_labels("imagenet", "train", imagenet_dir).tolist() == [3, 0, 999, 7, 5, 5, 1]
    assert load_labels("imagenet", "test", imagenet_dir).tolist() == [42, 8]
    source = registry.resolve_source("imagenet", imagenet_dir)
    assert source.kind == "hf-images"
    assert [p.name for p in source.files("train")] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]


def test_imagenet_rows_decode_at_the_image_size_with_crops_fixed_by_seed_and_row(imagenet_dir: Path) -> None:
    data = load_split("imagenet", "train", imagenet_dir, indices=[5, 0, 3], image_size=32, seed=4)
    assert data.images.shape == (3, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [5, 3, 7] and data.spec.image_size == (32, 32)
    # Row 5 (the second shard's second row, 33x90) is cut from (seed, 5) whichever rows come with it.
    alone = load_split("imagenet", "train", imagenet_dir, indices=[5], image_size=32, seed=4)
    assert torch.equal(alone.images[0], data.images[0])
    blob = pq.read_table(imagenet_dir / "imagenet" / "train-00001-of-00002.parquet")["image"][1].as_py()["bytes"]
    expected = classification_image(blob, "x", 5, 32, train=True, seed=4)
    assert np.array_equal(data.images[0].numpy(), expected)
    other = load_split("imagenet", "train", imagenet_dir, indices=[5, 0, 3], image_size=32, seed=5)
    assert not torch.equal(other.images, data.images)
    # The test split: resize + center crop, as the file reader cuts it; default size 224.
    test = load_split("imagenet", "test", imagenet_dir, image_size=32)
    whole, labels = read_classification(imagenet_dir / "imagenet" / "validation.parquet", 32, train=False)
    assert np.array_equal(test.images.numpy(), whole) and test.labels.tolist() == labels.tolist() == [42, 8]
    assert load_split("imagenet", "test", imagenet_dir, limit=1).images.shape == (1, 3, 224, 224)
    # ImageData checks against the effective size.
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, 3, 224, 224\], got torch.uint8 \[3, 3, 32, 32\]"):
        ImageData(data.images, data.labels, registry.get_spec("imagenet"))


def test_voc_masks_keep_255_and_labels_are_the_main_object_class(voc_dir: Path) -> None:
    assert load_labels("voc", "train", voc_dir).tolist() == [15, 0, 5]
    assert load_labels("voc", "test", voc_dir).tolist() == [5, 0, 15]
    data = load_split("voc", "train", voc_dir, image_size=20)
    assert data.spec.task == "segmentation" and data.spec.num_classes == 21
    images, masks = read_voc(voc_dir / "voc" / "train.parquet", 20)
    assert np.array_equal(data.images.numpy(), images) and np.array_equal(data.labels.numpy(), masks)
    assert data.labels.dtype == torch.uint8 and set(np.unique(data.labels[0].numpy())) == {0, 3, 15, 255}
    test = load_split("voc", "test", voc_dir, indices=[2])
    assert test.images.shape == (1, 3, 320, 320) and test.labels.shape == (1, 320, 320)
    assert 255 in test.labels


def test_a_directory_lacking_the_files_is_one_line_and_nothing_is_downloaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_hub(name: str) -> None:
        raise AssertionError(f"hub {name!r} was tried")

    monkeypatch.setattr(registry, "load_hub", no_hub)
    with pytest.raises(FileNotFoundError) as info:
        load_labels("imagenet", "train", tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "imagenet") in message
    assert "imagenet/train.parquet or imagenet/train-*.parquet or imagenet/data/train-*.parquet" in message
    monkeypatch.delenv("FEDCSG_DATA_DIR", raising=False)
    with pytest.raises(
        FileNotFoundError, match=r"^voc not found: looked in \$FEDCSG_DATA_DIR \(unset\) \(voc is never"
    ):
        load_split("voc", "train")
    monkeypatch.setenv("FEDCSG_DATA_DIR", str(tmp_path))
    (tmp_path / "voc").mkdir()
    write(tmp_path / "voc" / "train.parquet", {"image": [], "mask": []})  # no validation split
    with pytest.raises(FileNotFoundError, match=r"^voc not found: looked in .*voc \(\$FEDCSG_DATA_DIR is set"):
        load_labels("voc", "test")


def test_image_size_is_free_for_any_size_sets_and_fixed_elsewhere() -> None:
    assert RunConfig(model="resnet50", dataset="imagenet", image_size=96).data_settings.image_size == 96
    assert RunConfig(image_size=32).image_size == 32  # cifar10's own size
    with pytest.raises(ValueError, match=r"^image-size = 64 is not accepted for cifar10: its images are 32x32; "):
        RunConfig(image_size=64)
    for bad in (-1, 4096):
        with pytest.raises(ValueError, match=rf"^image-size = {bad} is not accepted: 0 \(imagenet's 224\) or an"):
            RunConfig(model="resnet50", dataset="imagenet", image_size=bad)
    with pytest.raises(ValueError, match=r"^image-size = 40 is not accepted for fashion-mnist: .*accepted is 0 or 28$"):
        load_split("fashion-mnist", "test", limit=1, image_size=40)
    assert registry.sized_spec("voc", 0).image_size == (320, 320)


def test_the_derived_set_is_found_where_its_base_is() -> None:
    source = registry.resolve_source("fashion-mnist-seg")
    assert source.kind == "derived" and source.base is not None and source.base.spec.name == "fashion-mnist"
    assert source.location == source.base.location


@pytest.mark.parametrize(
    ("name", "dataset", "size"), [("imagenet-resnet50", "imagenet", 224), ("voc-deeplabv3", "voc", 320)]
)
def test_shipped_gpu_configs_parse_and_fail_before_training_without_the_files(
    name: str, dataset: str, size: int, tmp_path: Path
) -> None:
    from fedcsg.cli.runs import preflight

    cfg = load_experiment(name)
    spec = registry.sized_spec(cfg.dataset, cfg.image_size)
    assert (
        cfg.dataset == dataset and spec.image_size == (size, size) and cfg.arm_list == ["fedavg", "csg", "csg-frozen"]
    )
    assert cfg.model_settings().slice == "16x16x3x3" and cfg.model_settings().code_dim == 128
    with pytest.raises(FileNotFoundError, match=rf"^{dataset} not found in data_dir: missing ") as info:
        preflight(cfg.replace(data_dir=str(tmp_path)), cfg.arm_list)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["imagenet-resnet50", "voc-deeplabv3", "fmnist-seg-deeplabv3"])
def test_issue_26_configs_run_their_models_own_slice(name: str) -> None:
    from fedcsg.nn.models import model_slice

    cfg = load_experiment(name)
    own = model_slice(cfg.model)
    assert (cfg.model_settings().slice, cfg.model_settings().code_dim) == (str(own.shape), own.code_dim)
