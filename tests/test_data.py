"""Tests for fedcsg.data on the real local copies of CIFAR-10 and Fashion-MNIST."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fedcsg.data import batches as batching
from fedcsg.data import partitions, readers, registry

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_test_labels(data_dir: Path) -> np.ndarray:
    return readers.load_labels("cifar10", "test", data_dir=data_dir)


@pytest.fixture(scope="module")
def cifar_train_labels(data_dir: Path) -> np.ndarray:
    return readers.load_labels("cifar10", "train", data_dir=data_dir)


@pytest.fixture(scope="module")
def small_cifar(data_dir: Path) -> readers.ImageData:
    return readers.load_split("cifar10", "test", data_dir=data_dir, limit=64, seed=1)


@pytest.fixture
def debian_fmnist(monkeypatch: pytest.MonkeyPatch, data_dir: Path, tmp_path: Path) -> Path:
    """A Debian-like system directory (what ``dataset-fashion-mnist`` installs under
    /usr/share/datasets/fashion-mnist), built from the shared idx files, with the Fashion-MNIST
    spec's system directory pointed at it: no system package is needed."""
    shared = data_dir / "fashion-mnist"
    names = [name for s in ("train", "test") for name in registry.DATASETS["fashion-mnist"].local_files(s)]
    missing = [name for name in names if not (shared / name).is_file()]
    if missing:
        pytest.fail(f"Fashion-MNIST idx files {missing} not found in {shared}; set FEDCSG_DATA_DIR", pytrace=False)
    system = tmp_path / "usr-share-datasets" / "fashion-mnist"
    system.mkdir(parents=True)
    for name in names:
        (system / name).symlink_to(shared / name)
    spec = dataclasses.replace(registry.DATASETS["fashion-mnist"], system_dir=str(system))
    monkeypatch.setattr(registry, "DATASETS", MappingProxyType({**registry.DATASETS, "fashion-mnist": spec}))
    return system


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def test_load_split_subset_shapes_and_dtypes(data_env: Path) -> None:
    subset = readers.load_split("cifar10", "test", limit=200)
    assert subset.images.shape == (200, 3, 32, 32)
    assert subset.images.dtype == torch.uint8
    assert subset.labels.shape == (200,)
    assert subset.labels.dtype == torch.int64
    assert 0 <= int(subset.labels.min()) and int(subset.labels.max()) < 10
    assert subset.spec is registry.DATASETS["cifar10"]
    assert len(subset) == 200
    # A seeded shuffle of a class-ordered file: several classes, roughly balanced.
    counts = np.bincount(subset.labels.numpy(), minlength=10)
    assert (counts > 5).all(), counts


def test_limit_is_deterministic_per_seed(data_env: Path) -> None:
    a = readers.load_split("cifar10", "test", limit=50, seed=3)
    b = readers.load_split("cifar10", "test", limit=50, seed=3)
    c = readers.load_split("cifar10", "test", limit=50, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_indices_select_rows_in_order(data_env: Path, cifar_test_labels: np.ndarray) -> None:
    rows = [9999, 0, 5, 5]
    subset = readers.load_split("cifar10", "test", indices=rows)
    assert subset.labels.tolist() == cifar_test_labels[rows].tolist()
    assert torch.equal(subset.images[2], subset.images[3])
    # An empty partition (possible with Dirichlet at many clients) loads as an empty set.
    empty = readers.load_split("cifar10", "test", indices=np.array([], dtype=np.int64))
    assert empty.images.shape == (0, 3, 32, 32) and len(batching.TensorBatches(empty, batch_size=8)) == 0


def test_labels_only_equal_decoded_labels_and_pixels(data_dir: Path, cifar_test_labels: np.ndarray) -> None:
    assert cifar_test_labels.shape == (10000,) and cifar_test_labels.dtype == np.int64
    assert np.bincount(cifar_test_labels).tolist() == [1000] * 10
    rows = np.random.default_rng(0).choice(10000, size=300, replace=False)
    subset = readers.load_split("cifar10", "test", data_dir=data_dir, indices=rows)
    assert subset.labels.numpy().tolist() == cifar_test_labels[rows].tolist()
    # Pixels equal a direct PIL decode of the same row.
    table = pq.read_table(data_dir / "cifar10" / "test.parquet")
    blob = table.column("img")[int(rows[7])].as_py()["bytes"]
    direct = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    assert np.array_equal(subset.images[7].permute(1, 2, 0).numpy(), direct)


def test_rows_are_read_a_batch_at_a_time_in_the_order_given(data_dir: Path) -> None:
    """A client's rows, streamed PARQUET_BATCH_ROWS at a time, equal those taken from the whole file:
    unsorted, repeated, on both sides of batch boundaries, and none at all."""
    path = data_dir / "cifar10" / "test.parquet"
    size = readers.PARQUET_BATCH_ROWS
    rng = np.random.default_rng(3)
    rows = np.concatenate([[size, size - 1, 0, 9999, size], rng.choice(10000, size=500, replace=False)])
    whole = pq.read_table(path, columns=["img", "label"])
    assert readers._take_parquet_rows(path, rows, ["img", "label"]).equals(whole.take(pa.array(rows)))
    assert readers._take_parquet_rows(path, np.array([], dtype=np.int64), ["label"]).num_rows == 0


def test_bad_index_and_limit(data_env: Path) -> None:
    with pytest.raises(ValueError, match="index 10000 out of range"):
        readers.load_split("cifar10", "test", indices=[0, 10000])
    with pytest.raises(ValueError, match="limit must be"):
        readers.load_split("cifar10", "test", limit=-1)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        readers.load_split("cifar10", "val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*cifar10, fashion-mnist"):
        readers.load_split("mnist", "test")


def test_explicit_data_dir_wins(monkeypatch: pytest.MonkeyPatch, data_dir: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDCSG_DATA_DIR", str(tmp_path))  # an env dir without data is not used
    source = registry.resolve_source("cifar10", data_dir)
    assert source.kind == "parquet" and Path(source.location) == data_dir / "cifar10"
    assert readers.load_split("cifar10", "test", data_dir=str(data_dir), limit=3).images.shape == (3, 3, 32, 32)


def test_missing_data_dir_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        registry.resolve_source("cifar10", missing)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        registry.resolve_source("cifar10", tmp_path)  # exists, but holds no cifar10/
    assert str(tmp_path / "cifar10") in str(info.value) and "train.parquet" in str(info.value)


def test_no_source_anywhere_lists_every_place(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(name: str) -> None:
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub\n(second line)")

    # Stand-in for the real offline failure, which retries for ~25 s before giving up.
    monkeypatch.setattr(registry, "load_hub", offline)
    monkeypatch.delenv("FEDCSG_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        registry.resolve_source("cifar10", hub_name="someone/cifar10-mirror")
    message = str(info.value)
    assert "\n" not in message
    assert "$FEDCSG_DATA_DIR (unset)" in message
    assert "someone/cifar10-mirror" in message and "Couldn't reach" in message
    with pytest.raises(FileNotFoundError, match=r"\$FEDCSG_DATA_DIR \(unset\).*uoft-cs/cifar10"):
        registry.resolve_source("cifar10")


def test_hub_source_decodes_like_local(monkeypatch: pytest.MonkeyPatch, data_dir: Path, tmp_path: Path) -> None:
    import datasets

    # The local parquet has the hub schema, so loading it with `datasets` imitates the hub offline.
    hub = {"test": datasets.Dataset.from_parquet(str(data_dir / "cifar10" / "test.parquet"), cache_dir=str(tmp_path))}
    monkeypatch.setattr(registry, "load_hub", lambda name: hub)
    monkeypatch.delenv("FEDCSG_DATA_DIR", raising=False)
    assert registry.resolve_source("cifar10").kind == "hub"
    from_hub = readers.load_split("cifar10", "test", limit=40)
    local = readers.load_split("cifar10", "test", data_dir=data_dir, limit=40)
    assert torch.equal(from_hub.images, local.images) and torch.equal(from_hub.labels, local.labels)
    assert np.array_equal(
        readers.load_labels("cifar10", "test"), readers.load_labels("cifar10", "test", data_dir=data_dir)
    )


def _write_both_splits(directory: Path, table: pa.Table) -> Path:
    (directory / "cifar10").mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(table, directory / "cifar10" / f"{split}.parquet")
    return directory / "cifar10" / "test.parquet"


@pytest.mark.parametrize(
    "table",
    [
        pa.table({"image": [b"x"], "label": [1]}),
        pa.table({"img": ["not a struct"], "label": [1]}),
        pa.table({"img": [{"bytes": b"x", "path": None}], "label": ["cat"]}),
    ],
    ids=["missing-img", "img-not-struct", "label-not-int"],
)
def test_malformed_parquet_names_file(tmp_path: Path, table: pa.Table) -> None:
    path = _write_both_splits(tmp_path, table)
    with pytest.raises(ValueError, match="expected parquet columns img") as info:
        readers.load_labels("cifar10", "test", data_dir=tmp_path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_not_a_parquet_file(tmp_path: Path) -> None:
    (tmp_path / "cifar10").mkdir()
    for split in ("train", "test"):
        (tmp_path / "cifar10" / f"{split}.parquet").write_bytes(b"definitely not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        readers.load_split("cifar10", "train", data_dir=tmp_path, limit=1)


def test_fashion_mnist_from_debian_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, debian_fmnist: Path) -> None:
    debian = debian_fmnist
    # A data directory without fashion-mnist/ sends the search on to the system (Debian) directory.
    empty = tmp_path / "no-fmnist"
    empty.mkdir()
    monkeypatch.setenv("FEDCSG_DATA_DIR", str(empty))
    source = registry.resolve_source("fashion-mnist")
    assert source.kind == "idx" and Path(source.location) == debian
    subset = readers.load_split("fashion-mnist", "test", limit=100)
    assert subset.images.shape == (100, 1, 28, 28) and subset.images.dtype == torch.uint8
    assert subset.spec.in_channels == 1
    labels = readers.load_labels("fashion-mnist", "train")
    assert labels.shape == (60000,) and np.bincount(labels).tolist() == [6000] * 10
    expected_rows = np.random.default_rng(0).permutation(10000)[:100]  # the documented `limit` rule
    assert subset.labels.tolist() == readers.load_labels("fashion-mnist", "test")[expected_rows].tolist()


def test_fashion_mnist_from_the_shared_data_dir(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    # $FEDCSG_DATA_DIR holding fashion-mnist/ (as ../shared/data does) is found before any system directory.
    monkeypatch.setenv("FEDCSG_DATA_DIR", str(data_dir))
    source = registry.resolve_source("fashion-mnist")
    assert source.kind == "idx" and Path(source.location) == data_dir / "fashion-mnist"
    assert readers.load_labels("fashion-mnist", "test").shape == (10000,)


def _linked_fmnist(root: Path, data_dir: Path) -> Path:
    """``root/fashion-mnist``: a link to each of the shared copy's files, for a test to replace some."""
    directory = root / "fashion-mnist"
    directory.mkdir(parents=True)
    for split in ("train", "test"):
        for name in registry.DATASETS["fashion-mnist"].local_files(split):
            (directory / name).symlink_to(data_dir / "fashion-mnist" / name)
    return directory


def test_corrupt_idx_file(tmp_path: Path, data_dir: Path) -> None:
    directory = _linked_fmnist(tmp_path / "copy", data_dir)
    (directory / "t10k-images-idx3-ubyte.gz").unlink()
    import gzip

    (directory / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01garbage"))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: not a uint8 idx file with 3"):
        readers.load_split("fashion-mnist", "test", data_dir=tmp_path / "copy", limit=2)


def test_idx_images_read_once_a_process_and_again_when_rewritten(tmp_path: Path, data_dir: Path) -> None:
    # A cross-device client takes a few rows of the decompressed file, which each process keeps.
    import gzip

    directory = _linked_fmnist(tmp_path / "copy", data_dir)
    first = readers.load_split("fashion-mnist", "test", data_dir=tmp_path / "copy", limit=5)
    first.images.zero_()  # a client's batch is its own: the kept images are untouched
    again = readers.load_split("fashion-mnist", "test", data_dir=tmp_path / "copy", limit=5)
    assert int(again.images.sum()) > 0
    images = directory / "t10k-images-idx3-ubyte.gz"
    whole = readers._read_idx(images, 3)
    images.unlink()
    images.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + np.array(whole.shape, ">i4").tobytes() + bytes(whole.size)))
    rewritten = readers.load_split("fashion-mnist", "test", data_dir=tmp_path / "copy", limit=5)
    assert int(rewritten.images.sum()) == 0 and rewritten.labels.tolist() == again.labels.tolist()


# --------------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------------

SCHEME_KWARGS = {
    "iid": {},
    "dirichlet": {"alpha": 0.3},
    "shards": {"shards_per_partition": 2},
}


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitions_disjoint_covering_deterministic(
    scheme: str, cifar_train_labels: np.ndarray, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    num = 10
    kwargs = SCHEME_KWARGS[scheme]
    parts = [partitions.partition_indices(cifar_train_labels, num, pid, scheme, **kwargs) for pid in range(num)]  # type: ignore[arg-type]
    everything = np.concatenate(parts)
    assert everything.dtype == np.int64
    assert everything.size == len(cifar_train_labels)  # disjoint and ...
    assert np.array_equal(np.sort(everything), np.arange(len(cifar_train_labels)))  # ... covering
    partitions._all_partitions.cache_clear()  # from the disk cache ...
    again = partitions.partition_indices(cifar_train_labels, num, 3, scheme, **kwargs)  # type: ignore[arg-type]
    assert np.array_equal(again, parts[3])
    partitions._all_partitions.cache_clear()  # ... and computed from scratch
    partitions._partitioner.cache_clear()
    monkeypatch.setenv("FEDCSG_CACHE_DIR", str(tmp_path))
    again = partitions.partition_indices(cifar_train_labels, num, 3, scheme, **kwargs)  # type: ignore[arg-type]
    assert np.array_equal(again, parts[3])
    other_seed = partitions.partition_indices(cifar_train_labels, num, 3, scheme, seed=1, **kwargs)  # type: ignore[arg-type]
    assert not np.array_equal(other_seed, parts[3])


def test_partition_label_skew(cifar_train_labels: np.ndarray) -> None:
    iid = partitions.partition_indices(cifar_train_labels, 10, 0, "iid")
    assert np.bincount(cifar_train_labels[iid], minlength=10).min() > 400  # ~500 per class: shuffled first
    for pid in range(10):
        shard = partitions.partition_indices(cifar_train_labels, 10, pid, "shards", shards_per_partition=2)
        assert len(np.unique(cifar_train_labels[shard])) <= 2  # 2 shards of 2,500 within single classes
    skewed = partitions.partition_indices(cifar_train_labels, 10, 0, "dirichlet", alpha=0.05)
    flat = partitions.partition_indices(cifar_train_labels, 10, 0, "dirichlet", alpha=1000.0)
    assert np.bincount(cifar_train_labels[skewed], minlength=10).max() > 0.5 * len(skewed)
    counts = np.bincount(cifar_train_labels[flat], minlength=10)
    assert counts.min() > 0.7 * counts.max()


def test_partitions_computed_once_and_read_from_disk_after(
    cifar_train_labels: np.ndarray, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first partition id asked for computes every partition and writes them to the cache; the
    others come from memory; a fresh process (here: emptied memory caches) reads the file and
    never builds a partitioner; an unreadable file is computed again, with the same rows."""
    monkeypatch.setenv("FEDCSG_CACHE_DIR", str(tmp_path))
    partitions._all_partitions.cache_clear()
    partitions._partitioner.cache_clear()
    first = [partitions.partition_indices(cifar_train_labels, 5, pid, "dirichlet", alpha=0.5) for pid in range(5)]
    assert partitions._partitioner.cache_info().misses == 1
    assert (partitions._all_partitions.cache_info().misses, partitions._all_partitions.cache_info().hits) == (1, 4)
    # A copy of the labels (same contents, new object) hits the same entry.
    partitions.partition_indices(cifar_train_labels.copy(), 5, 0, "dirichlet", alpha=0.5)
    assert partitions._all_partitions.cache_info().hits == 5
    (held,) = (tmp_path / "partitions").glob("*.npz")
    with np.load(held, allow_pickle=False) as arrays:
        assert sorted(arrays.files) == ["bounds", "rows"]
        assert list(np.diff(arrays["bounds"])) == [p.size for p in first]
    for damage in (b"", held.read_bytes()[:100], b"PK\x03\x04 not a zip"):
        held.write_bytes(damage)
        partitions._all_partitions.cache_clear()
        partitions._partitioner.cache_clear()
        again = [partitions.partition_indices(cifar_train_labels, 5, pid, "dirichlet", alpha=0.5) for pid in range(5)]
        assert all(np.array_equal(a, b) for a, b in zip(again, first, strict=True))
        assert partitions._partitioner.cache_info().misses == 1  # computed again, and written again
    partitions._all_partitions.cache_clear()
    partitions._partitioner.cache_clear()
    partitions.partition_indices(cifar_train_labels, 5, 2, "dirichlet", alpha=0.5)
    assert partitions._partitioner.cache_info().misses == 0  # read from the file


def test_a_client_with_the_cache_never_imports_flwr_datasets(
    cifar_train_labels: np.ndarray, data_dir: Path, tmp_path: Path
) -> None:
    """Partitions cached by one process (as `fedcsg run` does before the first round) are read by
    another without importing flwr_datasets or datasets, and are the same rows."""
    env = {**os.environ, "FEDCSG_CACHE_DIR": str(tmp_path), "FEDCSG_DATA_DIR": str(data_dir)}
    script = (
        "import sys\n"
        "from fedcsg.data.partitions import partition_indices\n"
        "from fedcsg.data.readers import load_labels\n"
        "labels = load_labels('cifar10', 'train')\n"
        "rows = partition_indices(labels, 8, 3, 'shards', seed=2)\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'flwr_datasets', 'datasets'})\n"
        "print(rows.size, rows[:20].tolist(), heavy)\n"
    )
    run = [sys.executable, "-c", script]
    computed = subprocess.run(run, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    read = subprocess.run(run, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert computed.returncode == 0 and read.returncode == 0, computed.stderr[-2000:] + read.stderr[-2000:]
    expected = partitions.partition_indices(cifar_train_labels, 8, 3, "shards", seed=2)
    assert computed.stdout.split(" [")[0] == read.stdout.split(" [")[0] == str(expected.size)
    assert f"{expected[:20].tolist()}" in read.stdout
    assert computed.stdout.rstrip().endswith("['datasets', 'flwr_datasets']")
    assert read.stdout.rstrip().endswith(" []")


def test_partitions_identical_in_a_new_process(cifar_train_labels: np.ndarray, data_dir: Path, tmp_path: Path) -> None:
    script = (
        "import sys, numpy as np\n"
        "from fedcsg.data.partitions import partition_indices\n"
        "from fedcsg.data.readers import load_labels\n"
        f"labels = load_labels('cifar10', 'train', data_dir={str(data_dir)!r})\n"
        "for scheme, kw in [('iid', {}), ('dirichlet', {'alpha': 0.3}), ('shards', {})]:\n"
        "    rows = partition_indices(labels, 20, 7, scheme, seed=5, **kw)\n"
        "    sys.stdout.write(scheme + ' ' + ','.join(map(str, rows[:50])) + ' ' + str(rows.size) + '\\n')\n"
    )
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    # An empty cache of its own: the new process computes the partitions, it does not read ours.
    env = {**os.environ, "PYTHONPATH": pythonpath, "FEDCSG_CACHE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for line, (scheme, kw) in zip(
        result.stdout.splitlines(), [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("shards", {})], strict=True
    ):
        rows = partitions.partition_indices(cifar_train_labels, 20, 7, scheme, seed=5, **kw)  # type: ignore[arg-type]
        assert line == scheme + " " + ",".join(map(str, rows[:50])) + " " + str(rows.size)


def test_dirichlet_many_partitions_allows_empty() -> None:
    labels = np.repeat(np.arange(10), 100)
    sizes = [partitions.partition_indices(labels, 500, pid, "dirichlet", alpha=0.1).size for pid in range(500)]
    assert sum(sizes) == 1000
    assert min(sizes) == 0  # min_partition_size=0: no resampling, no error


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_partitions": 0}, "num_partitions must be an integer >= 1, got 0"),
        ({"num_partitions": 2000}, "num_partitions 2000 exceeds the 1000 rows"),
        ({"partition_id": -1}, "partition_id -1 out of range"),
        ({"partition_id": 4}, "partition_id 4 out of range; accepted: 0 <= partition_id < 4"),
        ({"scheme": "pathological"}, "unknown partition scheme 'pathological'; accepted: iid, dirichlet, shards"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha must be a finite number > 0, got 0.0"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "alpha must be a finite number > 0, got -1.0"),
        ({"scheme": "shards", "shards_per_partition": 0}, "shards_per_partition must be >= 1"),
        ({"labels": np.zeros((10, 2), dtype=np.int64)}, "labels must be a 1-D integer array"),
    ],
)
def test_partition_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"labels": np.repeat(np.arange(10), 100), "num_partitions": 4, "partition_id": 0, "scheme": "iid"}
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        partitions.partition_indices(
            args.pop("labels"), args.pop("num_partitions"), args.pop("partition_id"), args.pop("scheme"), **args
        )
    assert message in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def test_batches_shapes_and_length(small_cifar: readers.ImageData) -> None:
    batches = batching.TensorBatches(small_cifar, batch_size=10)
    assert len(batches) == 7
    sizes = [(x.shape, x.dtype, y.shape, y.dtype) for x, y in batches]
    assert sizes[0] == ((10, 3, 32, 32), torch.float32, (10,), torch.int64)
    assert sizes[-1][0] == (4, 3, 32, 32)
    dropped = batching.TensorBatches(small_cifar, batch_size=10, drop_last=True)
    assert len(dropped) == 6 == len(list(dropped))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        batching.TensorBatches(small_cifar, batch_size=0)


def test_batches_normalise_with_spec_statistics(small_cifar: readers.ImageData) -> None:
    x, y = next(iter(batching.TensorBatches(small_cifar, batch_size=64)))
    mean = torch.tensor(small_cifar.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(small_cifar.spec.std).view(1, 3, 1, 1)
    expected = (small_cifar.images.float() / 255 - mean) / std
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, small_cifar.labels)


def test_normalised_full_split_is_standardised(data_dir: Path) -> None:
    # The JPEG copy's own statistics are close to the standard ones, so the result is ~N(0, 1).
    subset = readers.load_split("cifar10", "train", data_dir=data_dir, limit=2000)
    x = torch.cat([x for x, _ in batching.TensorBatches(subset, batch_size=500)])
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.05)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=0.05)


def _is_crop_or_flip(augmented: torch.Tensor, original: torch.Tensor, padding: int) -> bool:
    padded = torch.nn.functional.pad(original, (padding,) * 4)
    _, height, width = original.shape
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + height, dx : dx + width]
            if torch.equal(crop, augmented) or torch.equal(crop.flip(-1), augmented):
                return True
    return False


def test_augmentation_changes_images_keeps_labels(small_cifar: readers.ImageData) -> None:
    batches = batching.TensorBatches(small_cifar, batch_size=64, augment=True, seed=0)
    plain = batching.TensorBatches(small_cifar, batch_size=64)
    (x_aug, y_aug), (x_plain, y_plain) = next(iter(batches)), next(iter(plain))
    assert torch.equal(y_aug, y_plain)
    changed = (x_aug != x_plain).flatten(1).any(dim=1)
    assert changed.float().mean() > 0.9  # 1 in 162 (offset 4,4 unflipped) stays the same
    # Every augmented image is a zero-padded crop of its original, possibly flipped.
    generator = torch.Generator().manual_seed(0)
    raw = batching.augment_batch(small_cifar.images, generator, padding=4)
    assert raw.dtype == torch.uint8 and raw.shape == small_cifar.images.shape
    assert all(_is_crop_or_flip(raw[i], small_cifar.images[i], 4) for i in range(16))


def test_augmentation_flip_only_and_grayscale() -> None:
    spec = registry.DATASETS["fashion-mnist"]
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = batching.augment_batch(images, torch.Generator().manual_seed(1), padding=0)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)])
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, images, strict=True)])
    assert bool((flipped | same).all()) and 0 < int(flipped.sum()) < 32
    data = readers.ImageData(images, torch.zeros(32, dtype=torch.int64), spec)
    x, _ = next(iter(batching.TensorBatches(data, batch_size=8, augment=True, shuffle=True)))
    assert x.shape == (8, 1, 28, 28)


def test_batches_deterministic_per_seed_and_epoch(small_cifar: readers.ImageData) -> None:
    def epochs(seed: int, count: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        batches = batching.TensorBatches(small_cifar, batch_size=16, shuffle=True, augment=True, seed=seed)
        return [list(batches) for _ in range(count)]

    first, second = epochs(7, 2), epochs(7, 2)
    for epoch_a, epoch_b in zip(first, second, strict=True):
        for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Epochs differ from each other, and so do seeds.
    assert not torch.equal(first[0][0][1], first[1][0][1])
    assert not torch.equal(first[0][0][1], epochs(8, 1)[0][0][1])
    # set_epoch replays an epoch; a shuffle is a permutation of the labels.
    replay = batching.TensorBatches(small_cifar, batch_size=16, shuffle=True, augment=True, seed=7)
    replay.set_epoch(1)
    assert torch.equal(next(iter(replay))[0], first[1][0][0])
    labels = torch.cat([y for _, y in first[0]])
    assert torch.equal(labels.sort().values, small_cifar.labels.sort().values)


def test_image_data_validates() -> None:
    spec = registry.DATASETS["cifar10"]
    with pytest.raises(ValueError, match="images must be uint8"):
        readers.ImageData(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64), spec)
    with pytest.raises(ValueError, match="labels must be int64"):
        readers.ImageData(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), spec)
