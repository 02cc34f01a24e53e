"""Tasks and datasets. Importing this package registers every task in TASKS."""

from backdoors.data import (  # noqa: F401
    cifar,
    cifar100,
    counting,
    digits,
    gtsrb,
    image_folder,
    mnist,
    multimnist,
    pipa,
    synthetic,
    tiny_imagenet,
)
from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.data.loader import Loader
from backdoors.data.task import TASKS, Task

__all__ = ["TASKS", "ArrayDataset", "Dataset", "Loader", "Task"]
