"""Training data: datasets, transforms, batching and the bundled MNIST digits."""

from vqar.data.config import DataConfig
from vqar.data.datasets import (
    ArrayDataset,
    BadSample,
    DatasetSplit,
    ImageFolderDataset,
    MnistDataset,
    Sample,
    build_datasets,
    check_readable,
    load_array_file,
    open_dataset,
    split_dataset,
)
from vqar.data.loading import (
    BadFileReport,
    Batch,
    EpochSampler,
    collate_samples,
    evaluation_loader,
    make_loader,
    training_loader,
)
from vqar.data.mnist import load_mnist_digits
from vqar.data.shards import ShardDataset, is_shard_source, open_shards
from vqar.data.transforms import (
    convert_channels,
    fit_image,
    random_hflip,
    ten_crop,
    to_tensor,
    to_uint8_nhwc,
)

__all__ = [
    "ArrayDataset",
    "BadFileReport",
    "BadSample",
    "Batch",
    "DataConfig",
    "DatasetSplit",
    "ShardDataset",
    "EpochSampler",
    "ImageFolderDataset",
    "MnistDataset",
    "Sample",
    "build_datasets",
    "check_readable",
    "collate_samples",
    "convert_channels",
    "evaluation_loader",
    "fit_image",
    "is_shard_source",
    "load_array_file",
    "load_mnist_digits",
    "make_loader",
    "open_dataset",
    "open_shards",
    "random_hflip",
    "split_dataset",
    "ten_crop",
    "to_tensor",
    "to_uint8_nhwc",
    "training_loader",
]
