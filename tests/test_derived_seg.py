"""The derived segmentation set (issue 26): deterministic from its seed, masks exactly the pasted items."""

from __future__ import annotations

import numpy as np
import pytest

from fedcsg.data.readers import fashion_mnist_seg, load_split
from fedcsg.data.segmentation import CANVAS, paste_items


@pytest.fixture(scope="module")
def items() -> tuple[np.ndarray, np.ndarray]:
    data = load_split("fashion-mnist", "test", limit=200, seed=0)
    return data.images[:, 0].numpy(), data.labels.numpy()


def test_same_seed_same_set_other_seed_other_set(items: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = items
    first, again, other = (paste_items(images, labels, 20, seed) for seed in (3, 3, 4))
    assert np.array_equal(first.images, again.images) and np.array_equal(first.masks, again.masks)
    assert np.array_equal(first.placements, again.placements)
    assert not np.array_equal(first.images, other.images)


def test_masks_match_the_pasted_items(items: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = items
    pasted = paste_items(images, labels, 30, seed=7)
    assert pasted.images.shape == pasted.masks.shape == (30, CANVAS, CANVAS)
    for n in range(30):
        canvas = np.zeros((CANVAS, CANVAS), np.uint8)
        mask = np.zeros((CANVAS, CANVAS), np.uint8)
        for row, label, y, x in pasted.placements[n]:
            assert label == labels[row]
            item = images[row]
            on = item > 0
            canvas[y : y + 28, x : x + 28][on] = item[on]
            mask[y : y + 28, x : x + 28][on] = label + 1
        assert np.array_equal(pasted.images[n], canvas) and np.array_equal(pasted.masks[n], mask)
        # The topmost item is visible wherever it is non-zero, with its own class + 1.
        row, label, y, x = pasted.placements[n, -1]
        assert np.all(pasted.masks[n, y : y + 28, x : x + 28][images[row] > 0] == label + 1)
    assert set(np.unique(pasted.masks)) <= set(range(11)) and (pasted.masks == 0).any()
    # Background exactly where no item is non-zero.
    assert np.array_equal(pasted.masks == 0, pasted.images == 0)


def test_refuses_items_larger_than_the_canvas(items: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(ValueError, match=r"^canvas = 20 is not accepted: the items are 28x28"):
        paste_items(*items, 5, 0, canvas=20)


def test_the_registry_set_is_built_from_the_shared_images() -> None:
    test = fashion_mnist_seg("test", 10, seed=0)
    assert np.array_equal(test.masks, fashion_mnist_seg("test", 10, seed=0).masks)
    assert not np.array_equal(test.masks, fashion_mnist_seg("train", 10, seed=0).masks)


def test_masks_batch_with_their_images_and_flip_together(items: tuple[np.ndarray, np.ndarray]) -> None:
    import torch

    from fedcsg.data.batches import TensorBatches
    from fedcsg.data.readers import ImageData
    from fedcsg.data.registry import get_spec

    pasted = paste_items(*items, 16, seed=2)
    spec = get_spec("fashion-mnist")
    # A 56x56 spec stands in for the derived set's registry entry (not built yet).
    spec = type(spec)(**{**spec.__dict__, "image_size": (CANVAS, CANVAS), "num_classes": 11, "task": "segmentation"})
    data = ImageData(torch.from_numpy(pasted.images[:, None]), torch.from_numpy(pasted.masks), spec)
    batches = TensorBatches(data, 8, shuffle=True, augment=True, seed=0)
    seen = 0
    for x, y in batches:
        assert y.dtype == torch.int64 and y.shape == (x.shape[0], CANVAS, CANVAS)
        # Each mask still labels exactly the non-black pixels of its (possibly flipped) image.
        black = x[:, 0] == x.min()
        assert torch.equal(y == 0, black)
        seen += x.shape[0]
    assert seen == 16
    with pytest.raises(ValueError, match=r"labels must be int64 \[16\] \(classes\) or uint8 \[16, 56, 56\]"):
        ImageData(data.images, data.labels.long(), spec)


def test_local_training_and_evaluation_take_masks(items: tuple[np.ndarray, np.ndarray]) -> None:
    import torch

    from fedcsg.data.readers import ImageData
    from fedcsg.data.registry import get_spec
    from fedcsg.fl.task import evaluate_model, local_train
    from fedcsg.nn.segmentation import confusion_matrix, mean_iou, small_deeplabv3
    from fedcsg.spec.config import RunConfig

    pasted = paste_items(*items, 12, seed=3)
    spec = get_spec("fashion-mnist")
    spec = type(spec)(**{**spec.__dict__, "image_size": (CANVAS, CANVAS), "num_classes": 11, "task": "segmentation"})
    data = ImageData(torch.from_numpy(pasted.images[:, None]), torch.from_numpy(pasted.masks), spec)
    torch.manual_seed(0)
    model = small_deeplabv3(11, 1, widths=(8, 8, 8), aspp_channels=8)
    cfg = RunConfig(dataset="fashion-mnist-seg", model="deeplabv3-small")  # the run of such data
    stats = local_train(model, data, cfg, lr=0.05, epochs=1, batch_size=4, seed=0, device=torch.device("cpu"))
    assert stats.num_examples == 12 and 0 <= stats.accuracy <= 1
    evaluated = evaluate_model(model, data, cfg, torch.device("cpu"))
    x = (data.images.float() / 255 - spec.mean[0]) / spec.std[0]
    with torch.no_grad():
        expected = mean_iou(confusion_matrix(model(x).argmax(1), data.labels.long(), 11))
    assert evaluated.num_examples == 12 and evaluated.accuracy == pytest.approx(expected, abs=1e-9)


def test_the_registry_data_set_loads_through_the_readers() -> None:
    from fedcsg.data.readers import load_labels
    from fedcsg.data.readers import load_split as read

    labels = load_labels("fashion-mnist-seg", "test")
    assert labels.shape == (1000,) and set(np.unique(labels)) <= set(range(10))
    subset = read("fashion-mnist-seg", "test", indices=[5, 2, 999])
    whole = fashion_mnist_seg("test", 1000, seed=0)
    assert subset.images.shape == (3, 1, 56, 56) and subset.labels.shape == (3, 56, 56)
    assert np.array_equal(subset.labels.numpy(), whole.masks[[5, 2, 999]])
    assert np.array_equal(subset.images[:, 0].numpy(), whole.images[[5, 2, 999]])
    assert subset.spec.num_classes == 11
