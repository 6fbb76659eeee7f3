"""Numpy batch iterators: TFDS images, scikit-learn digits, image folders and 2-D toy sets.

Every data set is served by one :class:`BatchIterator` whose batch number ``step`` is a pure
function of ``(seed, step)``: the example order of epoch ``e`` is a permutation drawn from
``(seed, e)``, and the per-example augmentations (flips, dequantisation noise) from
``(seed, step, position in the global batch)``. Hence

* resuming is exact: save ``iterator.state`` (a small JSON-able dict) with a checkpoint and call
  ``iterator.restore(state)`` (or ``skip_to(step)``) to continue where it stopped;
* multi-host runs are exact: each process yields only its contiguous slice of every global batch,
  and the union over processes is the batch a single process would have produced, for any process
  count.

Images come as ``float32`` arrays ``(batch, H, W, C)`` in ``[0, 1]`` or, with ``centered=True``,
``[-1, 1]`` (the scaling of Song et al., 2021). Quantised data (8-bit images, the 17-level digits)
can be uniformly dequantised: ``x = (v + u) / L`` with ``u ~ U(0, 1)`` and ``L`` levels, instead of
``x = v / (L - 1)`` (Theis et al., 2016; used for the paper's likelihoods in bits/dim).

TFDS data sets are read through ``tfds.data_source`` (random access to ArrayRecord files, no
TensorFlow). Nothing is downloaded at run time: prepare a data set once with
``tfds build <name> --file_format=array_record`` and point ``TFDS_DATA_DIR`` (or ``data_dir=``)
at it.

>>> it = get_dataset("digits", split="train", batch_size=32, seed=0)
>>> batch = next(it)
>>> batch["x"].shape, batch["label"].shape, it.info.num_classes
((32, 8, 8, 1), (32,), 10)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BatchIterator",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "IMAGE_DATASETS",
    "TOY_DATASETS",
    "get_dataset",
    "sample_toy",
]

Batch = dict[str, np.ndarray]

# Tags that keep the random streams of different uses apart.
_SHUFFLE, _AUGMENT, _TOY = 1, 2, 3
_SPLIT_TAGS = {"train": 0, "test": 1, "validation": 2}


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS data set (or image folder) is not on disk; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set.

    Attributes:
      name: data set name as passed to :func:`get_dataset`.
      split: the split served.
      shape: shape of one example (``(H, W, C)`` for images, ``(2,)`` for toy sets).
      num_examples: examples in the split; ``None`` for the endless toy sets.
      num_classes: number of label classes; ``None`` when the batches carry no ``"label"``.
      num_levels: quantisation levels of the raw data (256 for 8-bit images, 17 for digits);
        ``None`` for continuous data.
      data_range: range of the values served, ``(-1, 1)`` when centred, ``(0, 1)`` otherwise;
        ``None`` for toy sets, which are served in their own coordinates.
    """

    name: str
    split: str
    shape: tuple[int, ...]
    num_examples: int | None
    num_classes: int | None
    num_levels: int | None
    data_range: tuple[float, float] | None


# -- the iterator --------------------------------------------------------------------------------


class BatchIterator:
    """An endless (or ``num_epochs``-long) iterator of host-local numpy batches, resumable by step.

    Built by :func:`get_dataset`. Batch ``step`` is :meth:`batch` ``(step)``, a pure function of the
    seed and the step; iterating simply calls it with ``step = 0, 1, 2, ...``.

    Attributes:
      info: the :class:`DatasetInfo`.
      batch_size: the global batch size (over all processes).
      local_batch_size: examples this process yields per (full) batch.
      steps_per_epoch: batches per pass over the data (``None`` for endless toy sets).
    """

    def __init__(
        self,
        info: DatasetInfo,
        batch_fn: Callable[[int, int, int], Batch],
        *,
        batch_size: int,
        seed: int,
        steps_per_epoch: int | None,
        num_epochs: int | None,
        process_index: int,
        process_count: int,
    ):
        self.info = info
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self.num_epochs = num_epochs
        self.process_index = process_index
        self.process_count = process_count
        self._batch_fn = batch_fn
        self._step = 0

    @property
    def num_steps(self) -> int | None:
        """Total number of batches, or ``None`` if endless."""
        if self.num_epochs is None or self.steps_per_epoch is None:
            return None
        return self.num_epochs * self.steps_per_epoch

    def batch(self, step: int) -> Batch:
        """Batch number ``step`` (this process's slice of it); does not move the iterator."""
        if step < 0 or (self.num_steps is not None and step >= self.num_steps):
            raise IndexError(f"step {step} out of range [0, {self.num_steps})")
        return self._batch_fn(step, self.process_index, self.process_count)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.num_steps is not None and self._step >= self.num_steps:
            raise StopIteration
        batch = self.batch(self._step)
        self._step += 1
        return batch

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("endless iterator has no length (pass num_epochs to get_dataset)")
        return self.num_steps

    # -- resuming ---------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Number of the batch that ``next`` returns next."""
        return self._step

    @property
    def state(self) -> dict[str, int]:
        """The position as a small JSON-able dict, to save with a checkpoint."""
        spe = self.steps_per_epoch
        return {
            "step": self._step,
            "epoch": self._step // spe if spe else 0,
            "index": self._step % spe if spe else self._step,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def skip_to(self, step: int) -> BatchIterator:
        """Moves the iterator so that ``next`` returns batch ``step``; returns ``self``."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        self._step = int(step)
        return self

    def restore(self, state: dict[str, Any]) -> BatchIterator:
        """Continues from a saved :attr:`state`; returns ``self``.

        Raises:
          ValueError: if the state was saved with another seed or global batch size, which would
            give another example order.
        """
        for key in ("seed", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"iterator state has {key}={state[key]} but this iterator has "
                    f"{key}={getattr(self, key)}; the data order would not continue"
                )
        return self.skip_to(int(state["step"]))

    def __repr__(self) -> str:
        return (
            f"BatchIterator({self.info.name!r}, split={self.info.split!r}, "
            f"batch_size={self.batch_size}, step={self._step})"
        )


def _host_slice(n: int, process_index: int, process_count: int) -> slice:
    """Contiguous slice of ``range(n)`` owned by one process (``np.array_split`` boundaries)."""
    base, extra = divmod(n, process_count)
    start = process_index * base + min(process_index, extra)
    return slice(start, start + base + (process_index < extra))


# -- finite (image) data sets --------------------------------------------------------------------


def _image_batch_fn(
    read: Callable[[np.ndarray], Batch],
    num_examples: int,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    drop_remainder: bool,
    centered: bool,
    random_flip: bool,
    dequantize: bool,
    num_levels: int,
) -> tuple[Callable[[int, int, int], Batch], int]:
    """The pure ``(step, process_index, process_count) -> batch`` of a finite data set."""
    if drop_remainder:
        steps_per_epoch = num_examples // batch_size
    else:
        steps_per_epoch = math.ceil(num_examples / batch_size)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch size {batch_size} exceeds the {num_examples} examples of the split "
            "(use drop_remainder=False or a smaller batch)"
        )
    cache: dict[int, np.ndarray] = {}

    def order(epoch: int) -> np.ndarray:
        if not shuffle:
            return np.arange(num_examples)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([seed, _SHUFFLE, epoch]).permutation(num_examples)
        return cache[epoch]

    def batch_fn(step: int, process_index: int, process_count: int) -> Batch:
        epoch, index = divmod(step, steps_per_epoch)
        start = index * batch_size
        global_idx = order(epoch)[start : start + batch_size]
        local = _host_slice(len(global_idx), process_index, process_count)
        out = read(global_idx[local])
        values = out.pop("image").astype(np.float32)
        positions = range(local.start, local.stop)
        rngs = [np.random.default_rng([seed, _AUGMENT, step, j]) for j in positions]
        if random_flip:
            flip = np.array([r.random() < 0.5 for r in rngs], bool)
            values[flip] = values[flip, :, ::-1]
        if dequantize:
            noise = np.stack([r.random(values.shape[1:], np.float32) for r in rngs])
            x = (values + noise) / num_levels
        else:
            x = values / (num_levels - 1)
        if centered:
            x = 2.0 * x - 1.0
        return {"x": x.astype(np.float32), **out}

    return batch_fn, steps_per_epoch


def _center_crop(image: np.ndarray, size: int | None) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(h, w) if size is None else size
    top, left = (h - s) // 2, (w - s) // 2
    return image[top : top + s, left : left + s]


def _resize(image: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or image.shape[:2] == (size, size):
        return image
    from PIL import Image

    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((size, size), Image.BICUBIC))  # antialiased when shrinking
    return out[..., None] if squeeze else out


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (levels 0..16), fixed split: 300 test, 1497 train examples."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    perm = np.random.default_rng(20210101).permutation(len(labels))  # fixed, seed-independent
    idx = perm[:300] if split == "test" else perm[300:]
    return images[idx], labels[idx]


@dataclasses.dataclass(frozen=True)
class _TFDSSpec:
    tfds_name: str
    shape: tuple[int, int, int]
    num_classes: int | None
    crop: int | None = None  # central crop before resizing (CelebA: 140, as in Song et al.)


_TFDS_SPECS = {
    "mnist": _TFDSSpec("mnist", (28, 28, 1), 10),
    "fashion_mnist": _TFDSSpec("fashion_mnist", (28, 28, 1), 10),
    "cifar10": _TFDSSpec("cifar10", (32, 32, 3), 10),
    "celeba": _TFDSSpec("celeb_a", (64, 64, 3), None, crop=140),
}


def _open_tfds(spec: _TFDSSpec, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    try:
        return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
    except (KeyError, FileNotFoundError, NotImplementedError, ValueError, AssertionError) as e:
        where = data_dir or "~/tensorflow_datasets (the default)"
        raise DatasetNotPreparedError(
            f"TFDS data set {spec.tfds_name!r} (split {split!r}) is not prepared in {where}. "
            f"Run `tfds build {spec.tfds_name} --file_format=array_record` once (add "
            "--data_dir=DIR to choose the place), then set TFDS_DATA_DIR=DIR or pass "
            "data_dir=DIR. "
            f"Nothing is downloaded at run time. (TFDS said: {e})"
        ) from e


def _tfds_reader(source, spec: _TFDSSpec, size: int) -> Callable[[np.ndarray], Batch]:
    def read(indices: np.ndarray) -> Batch:
        examples = [source[int(i)] for i in indices]
        images = [np.asarray(e["image"]) for e in examples]
        if spec.crop:
            images = [_center_crop(im, spec.crop) for im in images]
        images = [_resize(im, size) for im in images]
        out = {"image": np.stack(images) if images else np.zeros((0, size, size, spec.shape[-1]))}
        if spec.num_classes is not None:
            out["label"] = np.array([e["label"] for e in examples], np.int32)
        return out

    return read


_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _folder_files(root: str, split: str) -> list[str]:
    """Image files under ``root/split`` if that folder exists, else under ``root``, sorted."""
    if not root or not os.path.isdir(root):
        raise DatasetNotPreparedError(
            f"image folder {root!r} does not exist: pass data_dir=<folder of images> "
            "(e.g. LSUN exported to PNG/JPEG files)"
        )
    base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
    files = sorted(
        os.path.join(d, f)
        for d, _, names in os.walk(base)
        for f in names
        if f.lower().endswith(_IMAGE_EXTENSIONS)
    )
    if not files:
        raise DatasetNotPreparedError(f"no image files ({', '.join(_IMAGE_EXTENSIONS)}) in {base}")
    return files


def _folder_reader(files: Sequence[str], size: int) -> Callable[[np.ndarray], Batch]:
    from PIL import Image

    def read(indices: np.ndarray) -> Batch:
        images = []
        for i in indices:
            with Image.open(files[int(i)]) as im:
                images.append(_resize(_center_crop(np.asarray(im.convert("RGB")), None), size))
        return {"image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)}

    return read


# -- 2-D toy data sets -----------------------------------------------------------------------------


def sample_toy(name: str, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Draws ``n`` points ``(n, 2)`` (and labels, where the set has classes) from a 2-D toy set.

    ``gaussian_grid`` is the equal-weight 5x5 grid of isotropic Gaussians (spacing 1.5, std 0.15)
    whose exact density and score are
    ``GaussianMixture.grid(5, spacing=1.5, std=0.15, weights=np.ones(25))`` in ``jaxdiff.oracle``.
    """
    if name == "gaussian_grid":
        n_side, spacing, std = _GRID
        labels = rng.integers(0, n_side**2, n)
        r = (np.arange(n_side) - (n_side - 1) / 2) * spacing
        means = np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)
        return means[labels] + std * rng.standard_normal((n, 2)), labels
    if name == "two_moons":
        labels = rng.integers(0, 2, n)
        theta = np.pi * rng.random(n)
        x = np.where(labels == 0, np.cos(theta), 1.0 - np.cos(theta))
        y = np.where(labels == 0, np.sin(theta), 0.5 - np.sin(theta))
        pts = np.stack([x - 0.5, y - 0.25], -1) * 2.0
        return pts + 0.05 * rng.standard_normal((n, 2)), labels
    if name == "checkerboard":
        x1 = rng.random(n) * 4 - 2
        x2 = rng.random(n) - rng.integers(0, 2, n) * 2.0
        x2 = x2 + np.floor(x1) % 2
        return np.stack([x1, x2], -1), None
    if name == "swiss_roll":
        t = 1.5 * np.pi * (1 + 2 * rng.random(n))
        pts = np.stack([t * np.cos(t), t * np.sin(t)], -1) / 5.0
        return pts + 0.1 * rng.standard_normal((n, 2)), None
    if name == "rings":
        labels = rng.integers(0, 4, n)
        radius = 0.5 * (labels + 1)
        theta = 2 * np.pi * rng.random(n)
        pts = radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], -1)
        return pts + 0.04 * rng.standard_normal((n, 2)), labels
    raise ValueError(f"unknown toy data set {name!r}; valid: {', '.join(TOY_DATASETS)}")


_GRID = (5, 1.5, 0.15)  # n per side, spacing, std of the gaussian_grid toy set
TOY_DATASETS = {
    "gaussian_grid": 25,
    "two_moons": 2,
    "checkerboard": None,
    "swiss_roll": None,
    "rings": 4,
}
IMAGE_DATASETS = ("digits", *_TFDS_SPECS, "image_folder")


def _toy_batch_fn(name: str, *, batch_size: int, seed: int, split: str):
    split_tag = _SPLIT_TAGS[split]
    has_labels = TOY_DATASETS[name] is not None

    def batch_fn(step: int, process_index: int, process_count: int) -> Batch:
        rng = np.random.default_rng([seed, _TOY, split_tag, step])
        x, labels = sample_toy(name, rng, batch_size)  # 2-D: cheap to draw globally, then slice
        local = _host_slice(batch_size, process_index, process_count)
        out = {"x": x[local].astype(np.float32)}
        if has_labels:
            out["label"] = labels[local].astype(np.int32)
        return out

    return batch_fn


# -- the entry point -----------------------------------------------------------------------------


def get_dataset(
    name: str,
    *,
    split: str = "train",
    batch_size: int,
    seed: int = 0,
    centered: bool = True,
    shuffle: bool | None = None,
    random_flip: bool = False,
    dequantize: bool = False,
    drop_remainder: bool = True,
    num_epochs: int | None = None,
    image_size: int | None = None,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """Builds the resumable, host-sharded batch iterator of a data set.

    Args:
      name: one of :data:`IMAGE_DATASETS` (``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``,
        ``celeba``, ``image_folder``) or :data:`TOY_DATASETS` (``gaussian_grid``, ``two_moons``,
        ``checkerboard``, ``swiss_roll``, ``rings``).
      split: ``"train"``, ``"test"``, or any TFDS split string.
      batch_size: global batch size over all processes; must divide by ``process_count``.
      seed: seed of the example order and of the augmentations.
      centered: serve images in ``[-1, 1]`` (else ``[0, 1]``). Toy sets ignore it.
      shuffle: reshuffle every epoch; defaults to ``split == "train"``.
      random_flip: flip images horizontally with probability 1/2.
      dequantize: add ``U(0, 1)`` noise to the integer levels before scaling.
      drop_remainder: drop the last incomplete batch of each epoch (if kept, its examples are
        split over the processes as evenly as possible).
      num_epochs: stop after this many epochs; ``None`` for endless. Toy sets are always endless.
      image_size: resize images to ``image_size x image_size`` (CelebA: central 140 crop, then 64
        by default; ``image_folder``: central square crop, then 256 by default).
      data_dir: TFDS data directory (default: ``TFDS_DATA_DIR`` or TFDS's own default), or the root
        folder of ``image_folder`` (images in ``data_dir/split`` if it exists, else ``data_dir``).
      process_index: this process; defaults to ``jax.process_index()``.
      process_count: number of processes; defaults to ``jax.process_count()``.

    Returns:
      A :class:`BatchIterator` of dicts ``{"x": float32 (local_batch, *shape)}``, plus
      ``"label": int32 (local_batch,)`` where the data set has classes; ``iterator.info`` describes
      the data.

    Raises:
      ValueError: unknown name, or a batch size that does not divide by the process count.
      DatasetNotPreparedError: the TFDS data set or image folder is not on disk (says what to run).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    for arg, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0)):
        # NumPy integers are integers; floats (even 64.0), bools and negative seeds are not valid here.
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
            kind = "a positive integer" if low else "a non-negative integer"
            raise ValueError(f"{arg} must be {kind}, got {value!r}")
    batch_size, seed = int(batch_size), int(seed)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must be a positive multiple of process_count {process_count}"
        )
    common = dict(
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    if name in TOY_DATASETS:
        if split not in _SPLIT_TAGS:  # each split is its own random stream: a misspelt one would be a new set
            valid = ", ".join(map(repr, _SPLIT_TAGS))
            raise ValueError(f"split={split!r} is not a split of the toy data set {name!r}; valid: {valid}")
        info = DatasetInfo(name, split, (2,), None, TOY_DATASETS[name], None, None)
        batch_fn = _toy_batch_fn(name, batch_size=batch_size, seed=seed, split=split)
        return BatchIterator(info, batch_fn, steps_per_epoch=None, num_epochs=None, **common)

    if name == "digits":
        if split not in ("train", "test"):
            raise ValueError(f"digits has splits 'train' and 'test', got {split!r}")
        images, labels = _digits(split)
        if image_size not in (None, 8):
            # Bicubic overshoot is clipped back to the 17 levels.
            images = np.minimum(np.stack([_resize(im, image_size) for im in images]), 16)
        shape, num_classes, num_levels = images.shape[1:], 10, 17
        read = lambda idx: {"image": images[idx], "label": labels[idx]}
        num_examples = len(labels)
    elif name in _TFDS_SPECS:
        spec = _TFDS_SPECS[name]
        size = image_size or spec.shape[0]
        source = _open_tfds(spec, split, data_dir)
        shape, num_classes, num_levels = (size, size, spec.shape[-1]), spec.num_classes, 256
        read = _tfds_reader(source, spec, size)
        num_examples = len(source)
    elif name == "image_folder":
        size = image_size or 256
        files = _folder_files(data_dir, split)
        shape, num_classes, num_levels = (size, size, 3), None, 256
        read = _folder_reader(files, size)
        num_examples = len(files)
    else:
        valid = ", ".join((*IMAGE_DATASETS, *TOY_DATASETS))
        raise ValueError(f"unknown data set {name!r}; valid names: {valid}")

    info = DatasetInfo(
        name,
        split,
        tuple(shape),
        num_examples,
        num_classes,
        num_levels,
        (-1.0, 1.0) if centered else (0.0, 1.0),
    )
    batch_fn, steps_per_epoch = _image_batch_fn(
        read,
        num_examples,
        batch_size=batch_size,
        seed=seed,
        shuffle=(split == "train") if shuffle is None else shuffle,
        drop_remainder=drop_remainder,
        centered=centered,
        random_flip=random_flip,
        dequantize=dequantize,
        num_levels=num_levels,
    )
    return BatchIterator(
        info, batch_fn, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs, **common
    )
