"""Image data sets, federated partitions and tensor batching for fedcsg.

One module per step: :mod:`~fedcsg.data.registry` (which data sets exist and where they are found),
:mod:`~fedcsg.data.folders` (a user's own folder of images, described by the folder itself),
:mod:`~fedcsg.data.readers` (labels and decoded images), :mod:`~fedcsg.data.partitions` (federated
partitions from labels alone) and :mod:`~fedcsg.data.batches` (seeded, augmented batches on the device).

The data sets are listed in :data:`~fedcsg.data.registry.DATASETS`: CIFAR-10 and Fashion-MNIST,
the derived fashion-mnist-seg, and ImageNet and Pascal VOC read from local Hugging Face parquet files
(images of any size, cut to the run's ``image-size``). Each is held in memory as one ``uint8``
tensor ``[N, C, H, W]`` plus an ``int64`` label tensor, or ``uint8`` masks ``[N, H, W]`` for a
segmentation set (:class:`ImageData`), so a client in a simulation decodes only its own rows once
and then batches from memory.

Where the data comes from
-------------------------
:func:`resolve_source` looks, in order, in

1. an explicit ``data_dir`` (strict: it must hold the files, no fallback),
2. the directory named by the environment variable ``FEDCSG_DATA_DIR``,
3. the Debian package's directory (Fashion-MNIST only, ``apt-get install dataset-fashion-mnist``),
4. the Hugging Face hub (``datasets.load_dataset(hub_name)``, which also reads the local hub cache;
   never for imagenet and voc, which have no hub name and are never downloaded).

A data directory holds ``cifar10/{train,test}.parquet`` (schema of the hub dataset
``uoft-cs/cifar10``: ``img`` struct {bytes, path}, ``label`` int64) and/or
``fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (the original idx files),
``imagenet/`` and ``voc/`` (``{train,validation}.parquet`` or ``-*.parquet`` shards; see the registry).

Reading only what is needed
---------------------------
Labels are read on their own (one parquet column, or the small idx label file), partitions are
computed over labels alone (:func:`partition_indices`), and :func:`load_split` then decodes only
the selected rows. A client holding 500 of 50,000 CIFAR-10 images decodes 500 JPEGs, not 50,000.

Batching
--------
:class:`TensorBatches` replaces ``torch.utils.data.DataLoader``: it draws a seeded permutation per
epoch, gathers a ``uint8`` batch, moves it to the device and only there converts, augments
(random crop with zero padding, horizontal flip; vectorised over the batch) and normalises.
"""
