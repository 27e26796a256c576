"""Streaming an any-size set's rows from its parquet shards (fedcsg.data.streaming): every row once
an epoch, a fresh crop every epoch, the same batches for the same seed and worker count, and a
client's local training through it; the parquet files are the registry tests' small ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from fedcsg.data.hf_parquet import classification_image
from fedcsg.data.readers import ImageData
from fedcsg.data.registry import get_spec, resolve_source, sized_spec
from fedcsg.data.streaming import StreamedSplit
from fedcsg.fl.run_data import client_data
from fedcsg.fl.task import local_train
from fedcsg.spec.config import RunConfig

from .test_hf_registry import imagenet_dir, voc_dir  # noqa: F401 - fixtures

ROWS = np.array([0, 2, 3, 6])  # labels 3, 999, 7, 1: one row per label


def _split(root: Path, workers: int, dataset: str = "imagenet", rows: np.ndarray = ROWS) -> StreamedSplit:
    source = resolve_source(dataset, root)
    return StreamedSplit(source.files("train"), rows, sized_spec(dataset, 32), 4, workers)


def _epochs(split: StreamedSplit, epochs: int = 2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    batches = split.batches(2, seed=9, device="cpu")
    return [list(batches) for _ in range(epochs)]


def test_every_row_once_an_epoch_with_a_fresh_crop(imagenet_dir: Path) -> None:  # noqa: F811
    first, second = _epochs(_split(imagenet_dir, workers=0))
    for epoch in (first, second):
        assert sorted(int(y) for _, ys in epoch for y in ys) == [1, 3, 7, 999]
        assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x, _ in epoch)
    by_label = [{int(y): x[i] for x, ys in epoch for i, y in enumerate(ys)} for epoch in (first, second)]
    assert all(not torch.equal(by_label[0][label], by_label[1][label]) for label in (1, 3, 7, 999))
    # Row 6 (the second shard's third row) in epoch 0 is classification_image's cut from (seed 9, epoch 0, row 6).
    blob = pq.read_table(imagenet_dir / "imagenet" / "train-00001-of-00002.parquet")["image"][2].as_py()["bytes"]
    expected = torch.from_numpy(np.array(classification_image(blob, "x", 6, 32, train=True, seed=9, epoch=0)))
    spec = sized_spec("imagenet", 32)
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    assert torch.allclose(by_label[0][1], (expected.float() / 255 - mean) / std)


def test_worker_processes_give_the_same_batches_for_the_same_seed(imagenet_dir: Path) -> None:  # noqa: F811
    once, again = _epochs(_split(imagenet_dir, workers=2), 1), _epochs(_split(imagenet_dir, workers=2), 1)
    assert len(once[0]) == len(_split(imagenet_dir, workers=2).batches(2, 9, "cpu")) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(once[0], again[0], strict=True))
    assert sorted(int(y) for _, ys in once[0] for y in ys) == [1, 3, 7, 999]


def test_segmentation_pairs_stream_with_their_masks(voc_dir: Path) -> None:  # noqa: F811
    (epoch,) = _epochs(_split(voc_dir, workers=0, dataset="voc", rows=np.array([0, 1, 2])), 1)
    masks = torch.cat([y for _, y in epoch])
    assert masks.shape == (3, 32, 32) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= {0, 3, 5, 7, 15, 255}


def test_a_client_trains_on_its_streamed_rows_and_loader_workers_0_decodes_into_memory(
    imagenet_dir: Path,  # noqa: F811
) -> None:
    cfg = RunConfig(
        model="resnet20",
        arm="fedavg",
        dataset="imagenet",
        data_dir=str(imagenet_dir),
        image_size=32,
        num_clients=2,
        train_limit=0,
        loader_workers=1,
    )
    data = client_data(cfg, 0, 2)
    assert isinstance(data, StreamedSplit) and data.spec.num_classes == get_spec("imagenet").num_classes
    assert isinstance(client_data(cfg.replace(loader_workers=0), 0, 2), ImageData)
    model = cfg.model_settings().build()
    stats = local_train(model, data, cfg, lr=0.01, epochs=2, batch_size=2, seed=0, device=torch.device("cpu"))
    assert stats.num_examples == len(data) and np.isfinite(stats.loss)
