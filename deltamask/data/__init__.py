"""Datasets, client partitions and input preparation: offline loaders, Dirichlet splits, tensors.

Loaders return NumPy arrays and import no torch; `prepare_images` / `iter_prepared` import it when called.
"""
from deltamask.data.datasets import (DATASETS, Dataset, cache_dir, cifar_search_path, fashion_mnist_search_path,
                                     image_folder_classes, load_cifar, load_dataset, load_digits,
                                     load_fashion_mnist, load_image_folder, read_idx)
from deltamask.data.partition import (EFFECTIVE, PRESENT, class_coverage, device_share, dirichlet_partition,
                                      iid_partition, seeded_subset)
from deltamask.data.transforms import IMAGENET_MEAN, IMAGENET_STD, iter_prepared, prepare_images
from deltamask.errors import DataError

__all__ = [
    "DATASETS", "DataError", "Dataset", "EFFECTIVE", "IMAGENET_MEAN", "IMAGENET_STD", "PRESENT", "cache_dir",
    "cifar_search_path", "class_coverage", "device_share", "dirichlet_partition", "fashion_mnist_search_path", "iid_partition",
    "image_folder_classes", "iter_prepared", "load_cifar", "load_dataset", "load_digits", "load_fashion_mnist",
    "load_image_folder", "prepare_images", "read_idx", "seeded_subset",
]
