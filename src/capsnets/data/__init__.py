"""Datasets as LightningDataModules, their file-format readers and device-side transforms.

Every image DataModule yields batches ``(x_uint8, y)`` and converts them on the device in
``on_after_batch_transfer`` (float in [0, 1], plus the training-time random shift of
Sabour et al. 2017), so any model runs on any of them.
"""

from capsnets.data.cifar import CIFAR10DataModule, read_cifar_bin, write_cifar_bin
from capsnets.data.base import ImageClassificationDataModule, TensorPairDataset
from capsnets.data.idx import read_idx, write_idx
from capsnets.data.mnist import FashionMNISTDataModule, MNISTDataModule
from capsnets.data.norb import read_norb, write_norb
from capsnets.data.smallnorb import SmallNORBDataModule
from capsnets.data.synthetic import SyntheticDataModule
from capsnets.data.transforms import random_hflip, random_shift, shift_images

__all__ = [
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "ImageClassificationDataModule",
    "MNISTDataModule",
    "SmallNORBDataModule",
    "SyntheticDataModule",
    "TensorPairDataset",
    "random_hflip",
    "random_shift",
    "read_cifar_bin",
    "read_idx",
    "read_norb",
    "shift_images",
    "write_cifar_bin",
    "write_idx",
    "write_norb",
]
