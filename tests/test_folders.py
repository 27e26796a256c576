"""Image-classification data in a local folder (fedcsg.data.folders): an ImageFolder of PNG and JPEG
images of several sizes and a Hugging Face parquet folder of other column names, found, partitioned,
trained and evaluated in this process; each bad folder refused in one line, exit 2, nothing written.
Under Ray the same kind of folder is trained by the ``own`` and ``api`` runs of test_simulation.py."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fedcsg.data.readers import dataset_spec, load_labels, load_split
from fedcsg.fl import run_data, task
from fedcsg.spec.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own-model"


def write_shapes(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """The example's ImageFolder (examples/own-model/make_images.py): 3 classes, PNG and JPEG files of
    24 to 64 pixels a side, drawn from ``seed``."""
    spec = importlib.util.spec_from_file_location("make_images", EXAMPLE / "make_images.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_shapes(root, train_per_class, test_per_class, seed)


def _run(folder: Path, **changes: object) -> RunConfig:
    settings = dict(model="tests.user_cnn:SmallCNN", slice="8x8x3x3", code_dim=32, dataset="imagefolder")
    settings |= dict(data_dir=str(folder), image_size=16, num_clients=2, train_limit=0, test_limit=0, batch_size=8)
    return RunConfig(**{**settings, **changes})


def test_an_image_folder_of_png_and_jpeg_of_several_sizes_is_partitioned_trained_and_evaluated(tmp_path: Path) -> None:
    folder = write_shapes(tmp_path / "images", 6, 3)
    files = sorted((folder / "train").rglob("*.*"))
    assert {p.suffix for p in files} == {".png", ".jpg"} and len({Image.open(p).size for p in files}) > 10
    cfg = _run(folder)
    spec = cfg.dataset_spec()
    assert (spec.num_classes, spec.in_channels, spec.image_size) == (3, 3, (16, 16))
    # The statistics are the train split's, at the run's image size (18 images: all of them).
    train = load_split("imagefolder", "train", str(folder), image_size=16)
    pixels = train.images.double().div(255)
    assert spec.mean == tuple(round(v, 6) for v in pixels.mean(dim=(0, 2, 3)).tolist())
    assert spec.std == pytest.approx(pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-6)
    # Classes are the train folders in name order (circle, square, triangle), files in name order.
    assert load_labels("imagefolder", "train", str(folder)).tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert load_labels("imagefolder", "test", str(folder)).tolist() == [0] * 3 + [1] * 3 + [2] * 3
    settings = cfg.model_settings("csg")
    assert (settings.num_classes, settings.in_channels) == (3, 3)
    # Partitioned: two clients, disjoint, every train image once.
    rows = [run_data.partition_rows(cfg, i, 2) for i in range(2)]
    assert sorted(np.concatenate(rows).tolist()) == list(range(18)) and all(len(r) == 9 for r in rows)
    # Trained and evaluated as a registry set is.
    model = task.build_arm_model(cfg, "csg")
    data = run_data.client_data(cfg, 0, 2)
    assert tuple(data.images.shape) == (9, 3, 16, 16) and data.spec == spec
    stats = task.local_train(model, data, cfg, lr=0.05, epochs=1, batch_size=8, seed=0, device=torch.device("cpu"))
    assert stats.num_examples == 9 and np.isfinite(stats.loss)
    evaluated = task.evaluate_model(model, run_data.test_data(cfg), cfg, torch.device("cpu"))
    assert evaluated.num_examples == 9 and np.isfinite(evaluated.loss)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


def test_a_train_split_alone_is_cut_by_test_fraction_and_grayscale_images_give_one_channel(tmp_path: Path) -> None:
    folder = tmp_path / "gray"
    for label, name in enumerate(("a", "b")):
        (folder / "train" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (10 + i, 12), color=40 * label + 10 * i).save(folder / "train" / name / f"{i}.png")
    cfg = _run(folder, test_fraction=0.4, norm_mean="0.5", norm_std="0.25", image_size=8)
    spec = cfg.dataset_spec()
    assert (spec.num_classes, spec.in_channels, spec.mean, spec.std) == (2, 1, (0.5,), (0.25,))
    train, test = (
        load_labels("imagefolder", s, str(folder), folder=cfg.data_settings.folder) for s in ("train", "test")
    )
    assert (len(train), len(test)) == (6, 4)
    # A seeded cut (seed 0, whatever the run's seed), the same every time.
    assert test.tolist() == load_labels("imagefolder", "test", **cfg.replace(seed=7).data_settings.source).tolist()
    assert tuple(run_data.test_data(cfg).images.shape) == (4, 1, 8, 8)
    # A registry model takes the found class count and channels as a model of the user's does.
    resnet = task.build_arm_model(cfg.replace(model="resnet20", slice="12x12x3x3", code_dim=72), "csg").eval()
    assert resnet.conv1.in_channels == 1 and resnet(torch.zeros(2, 1, 8, 8)).shape == (2, 2)


def _encoded(image: Image.Image) -> dict[str, object]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _parquet(path: Path, labels: list[int]) -> None:
    pictures = [_encoded(Image.new("RGB", (12 + y, 9), color=(30 * y, 0, 0))) for y in labels]
    table = pa.table(
        {"picture": pictures, "fine": pa.array(labels, pa.int64()), "coarse": pa.array(labels, pa.int32())}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_a_parquet_folder_of_other_column_names_and_five_classes(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    _parquet(folder / "data" / "train-00000-of-00002.parquet", [0, 1, 2])
    _parquet(folder / "data" / "train-00001-of-00002.parquet", [3, 4, 0])
    _parquet(folder / "validation.parquet", [4, 1])
    with pytest.raises(ValueError, match="label-column not found: columns fine, coarse could each be it"):
        dataset_spec("parquet", 8, str(folder))
    cfg = _run(folder, dataset="parquet", label_column="fine", image_size=8)
    spec = cfg.dataset_spec()
    assert (spec.num_classes, spec.in_channels, spec.hub_image_column) == (5, 3, "picture")
    assert load_labels("parquet", "train", **cfg.data_settings.source).tolist() == [0, 1, 2, 3, 4, 0]
    test = load_split("parquet", "test", image_size=8, **cfg.data_settings.source)
    assert test.labels.tolist() == [4, 1] and tuple(test.images.shape) == (2, 3, 8, 8)
    assert test.images[0, 0].float().mean().item() == pytest.approx(120, abs=1)  # red 30 x 4, decoded


def _bad_folders(root: Path) -> dict[str, tuple[list[str], str]]:
    """Each bad input: (settings, what its one line says)."""
    good = write_shapes(root / "good", 2, 1)
    no_test = root / "no-test"
    (no_test / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(no_test / "train" / "a" / "0.png")
    empty_class = write_shapes(root / "empty-class", 2, 1)
    (empty_class / "test" / "circle" / "000.jpg").unlink()
    (empty_class / "test" / "circle" / "notes.txt").write_text("no image here")
    unreadable = write_shapes(root / "unreadable", 2, 1)
    (unreadable / "test" / "square" / "000.jpg").write_bytes(b"not a jpeg")
    stray_class = write_shapes(root / "stray-class", 2, 1)
    (stray_class / "test" / "owl").mkdir()
    Image.new("RGB", (4, 4)).save(stray_class / "test" / "owl" / "0.bmp")
    hf = root / "hf"
    _parquet(hf / "train.parquet", [0, 1])
    _parquet(hf / "test.parquet", [1])
    return {
        "missing": (["dataset='imagefolder'", f"data-dir='{root / 'nowhere'}'"], f"{root / 'nowhere'}' does not exist"),
        "no-test": (["dataset='imagefolder'", f"data-dir='{no_test}'"], f"{no_test}: missing split: no test/"),
        "no-train": (["dataset='imagefolder'", f"data-dir='{good / 'test'}'"], f"{good / 'test' / 'train'}: missing"),
        "empty": (
            ["dataset='imagefolder'", f"data-dir='{empty_class}'"],
            f"{empty_class / 'test' / 'circle'}: class folder with no image",
        ),
        "unreadable": (
            ["dataset='imagefolder'", f"data-dir='{unreadable}'"],
            f"{unreadable / 'test' / 'square' / '000.jpg'}: image does not decode",
        ),
        "no-data-dir": (["dataset='imagefolder'"], "dataset = 'imagefolder' needs data-dir: accepted is the folder"),
        "stray": (
            ["dataset='imagefolder'", f"data-dir='{stray_class}'"],
            f"{stray_class / 'test' / 'owl'}: class 'owl' is not a class of train/; accepted are circle, square,",
        ),
        "fraction": (
            ["dataset='imagefolder'", f"data-dir='{good}'", "test-fraction=0.25"],
            f"test-fraction = 0.25 is not accepted: {good} holds a test split (test/); accepted is 0",
        ),
        "column": (
            ["dataset='parquet'", f"data-dir='{hf}'", "image-column='img'"],
            f"image-column = 'img' is not an image column (struct with bytes) of {hf / 'train.parquet'}",
        ),
        "parquet-split": (["dataset='parquet'", f"data-dir='{good}'"], f"{good}: missing split: no train.parquet"),
    }


def test_each_bad_folder_is_one_line_exit_2_and_nothing_is_written(cli, tmp_path: Path) -> None:
    for name, (settings, message) in _bad_folders(tmp_path / "data").items():
        out = tmp_path / "runs" / name
        sets = [
            item
            for pair in [*settings, "model='tests.user_cnn:SmallCNN'", "train-limit=0", "test-limit=0"]
            for item in ("--set", pair)
        ]
        code, stdout, err = cli("compare", "--out", str(out), "--set", "image-size=8", *sets)
        assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, (name, err)
        assert err.startswith("fedcsg compare: error: ") and message in err, (name, err)
        assert not out.exists() and not (tmp_path / "runs").exists(), name


def test_bad_folder_settings_are_refused_by_the_run_config() -> None:
    with pytest.raises(ValueError, match=r"^test-fraction = 1\.0 is not accepted: a number in \[0, 1\) is$"):
        RunConfig(test_fraction=1.0)
    with pytest.raises(ValueError, match=r"^norm-std = '0.2,0' is not accepted: comma-separated numbers"):
        RunConfig(norm_std="0.2,0")
    with pytest.raises(ValueError, match=r"^image-size = 4096 is not accepted for a folder set: 0 \(64\) or an"):
        RunConfig(dataset="imagefolder", image_size=4096)


def test_a_folder_runs_model_is_exported_with_the_input_found_from_its_data(tmp_path: Path) -> None:
    """`fedcsg export` of a folder set's model: the image size and statistics its run found, read again
    from the run's data-dir (named by the run config beside the checkpoint, or --run-dir's)."""
    from safetensors import safe_open

    from fedcsg.deploy.export import export_checkpoint
    from fedcsg.runs.model_file import save_checkpoint

    cfg = _run(write_shapes(tmp_path / "images", 2, 1), arm="csg")
    settings = cfg.model_settings()
    checkpoint = save_checkpoint(settings.build(), tmp_path / "model.safetensors", settings)
    with pytest.raises(ValueError, match="takes the image size and normalisation of its run's data-dir, and no run"):
        export_checkpoint(checkpoint, ["compact"], tmp_path / "refused.safetensors")
    assert not (tmp_path / "refused.safetensors").exists()
    info, [path] = export_checkpoint(checkpoint, ["compact"], tmp_path / "c.safetensors", run_config=cfg.to_flower())
    spec = cfg.dataset_spec()
    with safe_open(str(path), "pt") as exported:
        metadata = exported.metadata()
    assert (info.num_classes, metadata["num-classes"], metadata["dataset"]) == (3, "3", "imagefolder")
    assert metadata["input"] == "float32 [N, 3, 16, 16], (x/255 - mean) / std"
    assert (json.loads(metadata["mean"]), json.loads(metadata["std"])) == (list(spec.mean), list(spec.std))
