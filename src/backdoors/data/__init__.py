"""Tasks and datasets. Importing this package registers every task in TASKS."""

from backdoors.data import cifar, counting, digits, image_folder, mnist, multimnist, pipa, synthetic  # noqa: F401,E501
from backdoors.data.dataset import ArrayDataset, Dataset
from backdoors.data.loader import Loader
from backdoors.data.task import TASKS, Task

__all__ = ["TASKS", "ArrayDataset", "Dataset", "Loader", "Task"]
