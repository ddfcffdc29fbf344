"""Datasets for ``python -m vitkernels.train``.

- ``digits_images``: scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1797 8x8
  grey images, 10 classes, shipped inside scikit-learn, so nothing is downloaded), upsampled (bilinear) to
  the image size, repeated to 3 channels and normalised; a fixed seeded 80/20 train/val split.
- ``digits_clips``: the same digits moving across ``num_frames`` frames of an ``img_size`` canvas (a seeded
  start position and velocity per sample, bouncing at the borders), clips (C, T, H, W), label = the digit.
- ``image_folder``: a ``torchvision.datasets.ImageFolder`` tree with ``train/`` and ``val/`` (without ``val/``,
  the same fixed seeded 80/20 split of the whole folder).

Every random choice is a function of the sample and the epoch only (split: ``SPLIT_SEED``; augmentation:
``(seed, epoch, index)``; clip trajectories: the sample), never of the process, the DataLoader workers or the
global RNG, so a resumed run, a run with more workers and a multi-process run read the same data.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from vitkernels.train._deps import require

SPLIT_SEED = 0          # the train/val split is the same for every --seed
VAL_FRACTION = 0.2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_CLIP_SIZE = 16      # a digit sprite of half the canvas must have room to move


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    classes: List[str]
    description: str
    mean: Tuple[float, ...] = field(default_factory=tuple)
    std: Tuple[float, ...] = field(default_factory=tuple)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_indices(n: int, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED):
    """A fixed seeded permutation of range(n) cut into (train, val) index lists."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def sample_rng(*key: int):
    """A numpy Generator that depends on ``key`` only (a seed sequence: no collisions between keys)."""
    np = require("numpy", "seeded per-sample augmentation")
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


class _EpochDataset(Dataset):
    """A dataset whose augmentation depends on (seed, epoch, index): ``set_epoch`` before each epoch's
    DataLoader iterator is made (workers get a copy of the dataset then)."""

    seed = 0
    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


def load_digits():
    """(images (N, 8, 8) float in [0, 1], labels (N,) int64) from scikit-learn's bundled copy."""
    datasets = require("sklearn.datasets", "the default digits dataset")
    bunch = datasets.load_digits()
    images = torch.from_numpy(bunch.images).float() / 16.0
    labels = torch.from_numpy(bunch.target).long()
    return images, labels


class DigitImages(_EpochDataset):
    """Digits upsampled to ``img_size`` (stored once, single channel), returned as (3, H, W) normalised.
    With ``augment``: a random translation of up to ``img_size // 8`` pixels (zero padding)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, img_size: int, mean: float, std: float,
                 augment: bool = False, seed: int = 0):
        up = F.interpolate(images[:, None], size=(img_size, img_size), mode="bilinear", align_corners=False)
        self.images = ((up - mean) / std).contiguous()          # (N, 1, H, W)
        self.background = (0.0 - mean) / std
        self.labels = labels
        self.augment = augment
        self.max_shift = img_size // 8
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.augment and self.max_shift > 0:
            s = self.max_shift
            dy, dx = sample_rng(self.seed, self.epoch, index).integers(0, 2 * s + 1, size=2).tolist()
            padded = F.pad(image, (s, s, s, s), value=self.background)
            image = padded[:, dy:dy + image.shape[1], dx:dx + image.shape[2]]
        return image.expand(3, -1, -1), int(self.labels[index])


def clip_trajectory(index: int, num_frames: int, travel: int, seed: int = SPLIT_SEED):
    """Integer (y, x) top-left positions of sample ``index``'s sprite over ``num_frames`` frames in a box of
    ``travel`` free pixels per axis: a seeded start and velocity, reflected at the borders."""
    rng = sample_rng(seed, 0x5EED, index)
    start = rng.uniform(0, travel, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    speed = max(1.0, travel * rng.uniform(0.1, 0.25))        # pixels per frame
    velocity = (speed * math.sin(angle), speed * math.cos(angle))
    positions = []
    for t in range(num_frames):
        frame = []
        for axis in range(2):
            p = start[axis] + velocity[axis] * t
            p = p % (2 * travel) if travel > 0 else 0.0     # bounce: fold the straight path into [0, travel]
            frame.append(int(round(p if p <= travel else 2 * travel - p)))
        positions.append(tuple(frame))
    return positions


class DigitClips(_EpochDataset):
    """Digits (scaled to half the canvas) moving across ``num_frames`` frames of an ``img_size`` canvas;
    clips (3, T, H, W) normalised, label = the digit. The clip of a sample is fixed (its trajectory is a
    function of its index in the full digits set)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ids: Sequence[int], img_size: int,
                 num_frames: int, mean: float, std: float):
        self.sprite = img_size // 2
        self.sprites = F.interpolate(images[:, None], size=(self.sprite, self.sprite), mode="bilinear",
                                     align_corners=False)[:, 0].clamp_(0, 1)
        self.labels = labels
        self.ids = list(ids)                 # each sample's index in the full set: its trajectory seed
        self.img_size, self.num_frames = img_size, num_frames
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def positions(self, index: int):
        return clip_trajectory(self.ids[index], self.num_frames, self.img_size - self.sprite)

    def raw_clip(self, index: int) -> torch.Tensor:
        """(T, H, W) in [0, 1], before normalisation."""
        canvas = torch.zeros(self.num_frames, self.img_size, self.img_size)
        s = self.sprite
        for t, (y, x) in enumerate(self.positions(index)):
            canvas[t, y:y + s, x:x + s] = self.sprites[index]
        return canvas

    def __getitem__(self, index: int):
        clip = (self.raw_clip(index) - self.mean) / self.std
        return clip.expand(3, -1, -1, -1), int(self.labels[index])


def _labels_of(dataset: Dataset) -> Optional[List[int]]:
    """The class of every sample, read from the dataset's label list (no sample is loaded), or None."""
    if isinstance(dataset, Subset):
        inner = _labels_of(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if isinstance(dataset, _SeededTransform):
        return _labels_of(dataset.dataset)
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)  # ImageFolder
    return None if labels is None else [int(label) for label in labels]


def _limit(dataset: Dataset, limit: Optional[int]) -> Dataset:
    """At most ``limit`` samples: a fixed seeded pick that takes the classes in turn (an ImageFolder lists its
    samples class by class: its first N would be one class), kept in the dataset's order."""
    if limit is None or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    labels = _labels_of(dataset)
    if labels is not None:
        queues: Dict[int, List[int]] = {}
        for i in order:
            queues.setdefault(labels[i], []).append(i)
        order = [i for turn in itertools.zip_longest(*(queues[c] for c in sorted(queues))) for i in turn
                 if i is not None]
    return Subset(dataset, sorted(order[:limit]))


def digits_images(img_size: int, augment: bool = False, seed: int = 0, train_limit: Optional[int] = None,
                  val_limit: Optional[int] = None) -> DataSplits:
    images, labels = load_digits()
    train_ids, val_ids = split_indices(len(labels))
    up = F.interpolate(images[train_ids][:, None], size=(img_size, img_size), mode="bilinear",
                       align_corners=False)
    mean, std = float(up.mean()), float(up.std())
    train = DigitImages(images[train_ids], labels[train_ids], img_size, mean, std, augment=augment, seed=seed)
    val = DigitImages(images[val_ids], labels[val_ids], img_size, mean, std)
    return DataSplits(_limit(train, train_limit), _limit(val, val_limit), [str(d) for d in range(10)],
                      f"digits (sklearn load_digits, 8x8 -> {img_size}x{img_size}, 3 channels), seeded 80/20 split",
                      (mean,) * 3, (std,) * 3)


def digits_clips(img_size: int, num_frames: int, train_limit: Optional[int] = None,
                 val_limit: Optional[int] = None) -> DataSplits:
    if img_size < MIN_CLIP_SIZE:
        raise ValueError(f"--img-size: the moving-digits clips need a canvas of at least {MIN_CLIP_SIZE} "
                         f"pixels (a digit of half the canvas moves in it); got {img_size}")
    if num_frames < 1:
        raise ValueError(f"--num-frames: must be >= 1, got {num_frames}")
    images, labels = load_digits()
    train_ids, val_ids = split_indices(len(labels))
    sprite = img_size // 2
    up = F.interpolate(images[train_ids][:, None], size=(sprite, sprite), mode="bilinear",
                       align_corners=False).clamp_(0, 1)
    # one sprite per frame, never overlapping itself: the canvas's moments are the sprite's times its area
    area = (sprite / img_size) ** 2
    mean = float(up.mean()) * area
    std = math.sqrt(float((up ** 2).mean()) * area - mean ** 2)
    train = DigitClips(images[train_ids], labels[train_ids], train_ids, img_size, num_frames, mean, std)
    val = DigitClips(images[val_ids], labels[val_ids], val_ids, img_size, num_frames, mean, std)
    return DataSplits(_limit(train, train_limit), _limit(val, val_limit), [str(d) for d in range(10)],
                      f"moving digits (sklearn load_digits on a {img_size}x{img_size} canvas, {num_frames} frames), "
                      "seeded 80/20 split", (mean,) * 3, (std,) * 3)


class _SeededTransform(_EpochDataset):
    """An ImageFolder (or a Subset of one) whose random transforms draw from torch's RNG seeded with
    (seed, epoch, index), forked so the caller's RNG is untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(sample_rng(self.seed, self.epoch, index).integers(0, 2 ** 62)))
            return self.dataset[index]


def image_folder(root: str, img_size: int, augment: bool = True, seed: int = 0,
                 train_limit: Optional[int] = None, val_limit: Optional[int] = None) -> DataSplits:
    import os

    datasets = require("torchvision.datasets", "--data (ImageFolder)")
    T = require("torchvision.transforms", "--data (ImageFolder)")
    if not os.path.isdir(root):
        raise ValueError(f"--data: {root!r} is not a directory")
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if augment:
        train_tf = T.Compose([T.RandomResizedCrop(img_size, scale=(0.35, 1.0), antialias=True),
                              T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    else:
        train_tf = T.Compose([T.Resize(img_size, antialias=True), T.CenterCrop(img_size), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(int(math.ceil(img_size / 0.875)), antialias=True), T.CenterCrop(img_size),
                        T.ToTensor(), normalize])
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        train = datasets.ImageFolder(train_dir, transform=train_tf)
        val = datasets.ImageFolder(val_dir, transform=val_tf)
        if train.classes != val.classes:
            raise ValueError(f"--data: {train_dir} and {val_dir} have different class folders "
                             f"({len(train.classes)} vs {len(val.classes)}; first differences: "
                             f"{sorted(set(train.classes) ^ set(val.classes))[:5]})")
        how = "train/ and val/"
    else:
        base = train_dir if os.path.isdir(train_dir) else root
        full_train = datasets.ImageFolder(base, transform=train_tf)
        full_val = datasets.ImageFolder(base, transform=val_tf)
        train_ids, val_ids = split_indices(len(full_train))
        train, val = Subset(full_train, train_ids), Subset(full_val, val_ids)
        train.classes = full_train.classes
        how = "no val/ folder: seeded 80/20 split"
    classes = list(train.classes)
    return DataSplits(_limit(_SeededTransform(train, seed), train_limit), _limit(val, val_limit), classes,
                      f"ImageFolder {root} ({len(classes)} classes, {how}, {img_size}x{img_size})",
                      IMAGENET_MEAN, IMAGENET_STD)


def set_epoch(dataset: Dataset, epoch: int) -> None:
    """Tell a dataset (through Subset wrappers) which epoch its augmentation is drawing for."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, _EpochDataset):
        dataset.set_epoch(epoch)
