"""Tests of the numpy batch iterators: determinism, resuming, host sharding, transforms, TFDS."""

import json
import sys

import numpy as np
import pytest

from jaxdiff import data

SINGLE = dict(process_index=0, process_count=1)


def _digits(**kw):
    kw = {"batch_size": 32, "seed": 0, **SINGLE, **kw}
    return data.get_dataset("digits", **kw)


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# -- digits: the embedded default ----------------------------------------------------------------


def test_digits_batches_and_info():
    it = _digits(centered=True)
    batch = next(it)
    assert batch["x"].shape == (32, 8, 8, 1) and batch["x"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0
    assert set(np.unique(batch["label"])) <= set(range(10))
    info = it.info
    assert (info.shape, info.num_examples, info.num_classes) == ((8, 8, 1), 1497, 10)
    assert info.num_levels == 17 and info.data_range == (-1.0, 1.0)
    assert (
        data.get_dataset("digits", split="test", batch_size=10, **SINGLE).info.num_examples == 300
    )


def test_digits_split_is_fixed_and_covers_the_data():
    from sklearn.datasets import load_digits

    def epoch(split, seed):
        it = _digits(split=split, seed=seed, batch_size=64, drop_remainder=False, num_epochs=1)
        batches = list(it)
        return np.concatenate([b["x"] for b in batches]), np.concatenate(
            [b["label"] for b in batches]
        )

    x_tr, y_tr = epoch("train", seed=1)
    x_te, y_te = epoch("test", seed=2)
    x_tr2, _ = epoch("train", seed=3)
    # Same examples whatever the seed (only the order changes): the split does not depend on it.
    key = lambda x: sorted(map(bytes, np.round(x * 16).astype(np.uint8)))
    assert key(x_tr) == key(x_tr2)
    # Train and test together are exactly the 1797 digits of scikit-learn.
    digits = load_digits()
    levels = np.round((np.concatenate([x_tr, x_te]) + 1) / 2 * 16).astype(np.uint8)
    assert sorted(map(bytes, levels)) == sorted(
        map(bytes, digits.images.astype(np.uint8)[..., None])
    )
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([y_tr, y_te])), np.bincount(digits.target)
    )


def test_digits_resized():
    it = _digits(image_size=16, centered=False)
    batch = next(it)
    assert batch["x"].shape == (32, 16, 16, 1) and it.info.shape == (16, 16, 1)
    assert batch["x"].min() >= 0.0 and batch["x"].max() <= 1.0


def test_uncentered_range_and_exact_levels():
    batch = next(_digits(centered=False))
    assert batch["x"].min() >= 0.0 and batch["x"].max() <= 1.0
    np.testing.assert_allclose(batch["x"] * 16, np.round(batch["x"] * 16), rtol=0, atol=1e-5)


def test_dequantization_stays_in_its_bin():
    plain = _digits(centered=False).batch(3)["x"]
    deq = _digits(centered=False, dequantize=True).batch(3)["x"]
    levels = np.round(plain * 16)
    assert np.all(deq >= levels / 17 - 1e-6) and np.all(deq < (levels + 1) / 17 + 1e-6)
    frac = deq * 17 - levels
    assert 0.4 < frac.mean() < 0.6  # U(0, 1) noise, 8192 draws


def test_random_flip_mirrors_about_half_the_images():
    plain = _digits(batch_size=256).batch(0)["x"]
    flipped = _digits(batch_size=256, random_flip=True).batch(0)["x"]
    same = np.all(flipped == plain, axis=(1, 2, 3))
    mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 0.35 < mirrored.mean() < 0.65


# -- order, epochs, resuming ---------------------------------------------------------------------


def test_each_epoch_is_a_fresh_permutation():
    it = _digits(batch_size=100, centered=False, shuffle=True)
    assert it.steps_per_epoch == 14  # 1497 // 100, remainder dropped
    ids = lambda b: [
        bytes(x) + bytes([y])
        for x, y in zip(np.round(b["x"] * 16).astype(np.uint8), b["label"], strict=True)
    ]
    epoch0 = [i for s in range(14) for i in ids(it.batch(s))]
    epoch1 = [i for s in range(14, 28) for i in ids(it.batch(s))]
    assert len(set(epoch0)) > 1300  # distinct examples (a few digits repeat exactly)
    assert epoch0 != epoch1


def test_batch_is_a_pure_function_of_seed_and_step():
    a, b = _digits(random_flip=True, dequantize=True), _digits(random_flip=True, dequantize=True)
    _equal(a.batch(57), b.batch(57))
    c = _digits(seed=1, random_flip=True, dequantize=True)
    assert not np.array_equal(a.batch(57)["x"], c.batch(57)["x"])


def test_resume_continues_exactly():
    kw = dict(random_flip=True, dequantize=True, batch_size=64)
    it = _digits(**kw)
    for _ in range(30):  # crosses an epoch boundary (23 batches per epoch)
        next(it)
    saved = json.loads(json.dumps(it.state))
    assert saved == {"step": 30, "epoch": 1, "index": 7, "seed": 0, "batch_size": 64}
    expected = [next(it) for _ in range(20)]
    resumed = _digits(**kw).restore(saved)
    for e in expected:
        _equal(e, next(resumed))
    _equal(_digits(**kw).skip_to(31).batch(31), expected[1])
    with pytest.raises(ValueError, match="seed"):
        _digits(seed=5, **kw).restore(saved)


def test_num_epochs_and_remainder():
    it = _digits(split="test", batch_size=64, drop_remainder=False, num_epochs=2, shuffle=False)
    sizes = [b["x"].shape[0] for b in it]
    assert sizes == [64, 64, 64, 64, 44] * 2 and len(it) == 10
    with pytest.raises(StopIteration):
        next(it)
    it = _digits(split="test", batch_size=64, drop_remainder=True, num_epochs=1)
    assert [b["x"].shape[0] for b in it] == [64] * 4


# -- multi-host sharding -------------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("name", ["digits", "two_moons"])
def test_union_over_hosts_is_the_single_host_batch(name, process_count):
    kw = dict(batch_size=40, seed=3, random_flip=True, dequantize=True, drop_remainder=False)
    if name != "digits":
        kw = dict(batch_size=40, seed=3)
    single = data.get_dataset(name, **kw, **SINGLE)
    hosts = [
        data.get_dataset(name, **kw, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    assert hosts[0].local_batch_size == 40 // process_count
    steps = [0, 5, 37] + ([single.steps_per_epoch - 1] if single.steps_per_epoch else [])
    for step in steps:  # the last one is the partial batch of 1497 % 40 = 17 examples
        parts = [h.batch(step) for h in hosts]
        union = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        _equal(union, single.batch(step))


def test_batch_size_must_divide_by_process_count():
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.get_dataset("digits", batch_size=30, process_index=0, process_count=4)


def test_default_process_arguments_come_from_jax():
    it = data.get_dataset("digits", batch_size=16)
    assert (it.process_index, it.process_count) == (0, 1)


# -- toy sets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(data.TOY_DATASETS))
def test_toy_sets(name):
    it = data.get_dataset(name, batch_size=512, seed=0, **SINGLE)
    batch = next(it)
    assert batch["x"].shape == (512, 2) and batch["x"].dtype == np.float32
    assert np.all(np.isfinite(batch["x"])) and np.abs(batch["x"]).max() < 10
    assert it.info.shape == (2,) and it.info.num_examples is None
    if it.info.num_classes is None:
        assert "label" not in batch
    else:
        assert batch["label"].min() >= 0 and batch["label"].max() < it.info.num_classes
    assert not np.array_equal(batch["x"], next(it)["x"])
    test = data.get_dataset(name, split="test", batch_size=512, seed=0, **SINGLE)
    assert not np.array_equal(test.batch(0)["x"], it.batch(0)["x"])


def test_gaussian_grid_matches_the_oracle_mixture():
    from jaxdiff.oracle import GaussianMixture

    gm = GaussianMixture.grid(5, spacing=1.5, std=0.15, weights=np.ones(25))
    x, labels = data.sample_toy("gaussian_grid", np.random.default_rng(0), 40_000)
    np.testing.assert_allclose(x.mean(0), np.asarray(gm.mean()), atol=0.05)
    np.testing.assert_allclose(np.cov(x.T), np.asarray(gm.covariance()), rtol=0.03, atol=0.05)
    # Each point is near its component's mean.
    dist = np.linalg.norm(x - np.asarray(gm.means)[labels], axis=-1)
    assert np.quantile(dist, 0.99) < 0.15 * 3.1


# -- errors --------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid names:.*digits.*cifar10.*two_moons"):
        data.get_dataset("imagenet", batch_size=8, **SINGLE)


def test_missing_tfds_dataset_says_what_to_run(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError, match="tfds build mnist") as e:
        data.get_dataset("mnist", batch_size=8, data_dir=str(tmp_path), **SINGLE)
    assert "TFDS_DATA_DIR" in str(e.value)


# -- TFDS through data_source, mocked ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape, labelled",
    [
        ("mnist", (28, 28, 1), True),
        ("fashion_mnist", (28, 28, 1), True),
        ("cifar10", (32, 32, 3), True),
        ("celeba", (64, 64, 3), False),
    ],
)
def test_tfds_data_source_without_tensorflow(name, shape, labelled):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        it = data.get_dataset(
            name, batch_size=8, seed=0, centered=False, random_flip=True, **SINGLE
        )
        batch = next(it)
        again = data.get_dataset(
            name, batch_size=8, seed=0, centered=False, random_flip=True, **SINGLE
        )
        _equal(again.batch(0), batch)
    assert batch["x"].shape == (8, *shape) and it.info.shape == shape
    assert it.info.num_examples == 12 and it.info.num_levels == 256
    assert batch["x"].min() >= 0.0 and batch["x"].max() <= 1.0
    assert ("label" in batch) == labelled
    assert "tensorflow" not in sys.modules


def test_tfds_resize(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        it = data.get_dataset("mnist", batch_size=4, image_size=32, **SINGLE)
        assert next(it)["x"].shape == (4, 32, 32, 1) and it.info.shape == (32, 32, 1)


# -- image folders -------------------------------------------------------------------------------


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "bedroom"
    (root / "train" / "a").mkdir(parents=True)
    for i in range(6):  # non-square images of different sizes, in nested folders
        img = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "train" / ("a" if i % 2 else "") / f"{i}.png")
    it = data.get_dataset(
        "image_folder", data_dir=str(root), batch_size=3, image_size=16, num_epochs=1, **SINGLE
    )
    batches = list(it)
    assert len(batches) == 2 and batches[0]["x"].shape == (3, 16, 16, 3)
    assert it.info.num_examples == 6 and it.info.num_classes is None
    assert all(-1.0 <= b["x"].min() and b["x"].max() <= 1.0 for b in batches)
    with pytest.raises(data.DatasetNotPreparedError, match="does not exist"):
        data.get_dataset("image_folder", data_dir=str(tmp_path / "none"), batch_size=2, **SINGLE)
