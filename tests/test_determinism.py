"""Determinism: the same model, config and seed give the same train state and checkpoint, bit for bit.

Two runs build everything afresh (model, optimiser, loss, a newly jitted train step and its compilation)
and train for a few steps; a third run with another seed must differ.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import data, losses, models, train
from jaxdiff.checkpoint import Checkpointer
from jaxdiff.sde import VPSDE

STEPS = 3
BATCH = 16


def _build():
    """A fresh model, optimiser and jitted train step; counts the traces of the loss."""
    model = models.MLP(hidden_sizes=(16, 16), embedding_size=8, embedding_type="positional")
    tx = train.make_optimizer(learning_rate=1e-2, warmup=2, grad_clip=1.0)
    loss_fn = losses.make_loss_fn(VPSDE(), model)
    traces = []

    def counted_loss_fn(*args):
        traces.append(1)  # runs at trace time only
        return loss_fn(*args)

    return model, tx, train.make_train_step(counted_loss_fn, tx, ema_rate=0.9), traces


def _train(seed: int, build=None):
    """``STEPS`` steps from ``seed``, with a fresh build unless one is given; returns host copies."""
    model, tx, train_step, traces = build or _build()
    ds = data.get_dataset("gaussian_grid", batch_size=BATCH, seed=seed)
    state = train.create_train_state(jax.random.key(seed), model, jnp.zeros((BATCH, 2)), tx)
    metrics = []
    for _ in range(STEPS):
        state, m = train_step(state, next(ds))
        metrics.append(m)
    return jax.device_get(state), jax.device_get(metrics), len(traces)


@pytest.fixture(scope="module")
def runs():
    build = _build()
    first, second = _train(0), _train(0, build)
    return {"first": first, "second": second, "build": build}


def _leaves(tree):
    """Leaves as numpy arrays, typed PRNG keys as their key data."""
    return [
        np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        for x in jax.tree.leaves(tree)
    ]


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)  # exact: no tolerance


def test_same_seed_same_state_bitwise(runs):
    (state_a, metrics_a, traces_a), (state_b, metrics_b, traces_b) = runs["first"], runs["second"]
    # Each run traced (and compiled) its own step exactly once.
    assert traces_a == traces_b == 1
    assert int(state_a.step) == STEPS
    assert_bitwise_equal(state_a, state_b)
    assert_bitwise_equal(metrics_a, metrics_b)


def test_different_seed_different_params(runs):
    state_a = runs["first"][0]
    state_c, _, traces = _train(1, runs["build"])  # the compiled step of the second run, reused
    assert traces == 1
    for x, y in zip(_leaves(state_a.params), _leaves(state_c.params), strict=True):
        assert not np.array_equal(x, y)
    assert not np.array_equal(_leaves(state_a.key)[0], _leaves(state_c.key)[0])


# Files of a step directory that are deterministic functions of the saved tree: orbax's tree, sharding
# and array metadata and the JSON metadata item. The rest is not comparable byte for byte: the array
# data live in an OCDBT key-value store (``manifest.ocdbt``, ``d/<random name>``) whose data files have
# random names and group the chunks by the order the concurrent writes finish, so the same arrays are
# spread over different files; ``_CHECKPOINT_METADATA`` holds timestamps and the ``commit_success.txt``
# markers the absolute path. The array data are compared after restoring instead.
_DETERMINISTIC_FILES = ("state/_METADATA", "state/_sharding", "state/array_metadatas/process_0", "metadata/metadata")


def test_same_seed_same_checkpoint_bitwise(runs, tmp_path):
    (state_a, _, _), (state_b, _, _) = runs["first"], runs["second"]
    for name, state in (("a", state_a), ("b", state_b)):
        ckpt = Checkpointer(tmp_path / name)
        ckpt.save(STEPS, state, metadata={"data": {"step": STEPS, "seed": 0}})
        ckpt.close()

    target = jax.tree.map(jnp.zeros_like, state_a)
    target = target.replace(key=jax.random.key(123))  # any key of the same implementation
    restored = []
    for name in ("a", "b"):
        ckpt = Checkpointer(tmp_path / name)
        restored.append(ckpt.restore(target))
        ckpt.close()
    assert_bitwise_equal(restored[0], restored[1])
    assert_bitwise_equal(restored[0], state_a)

    for rel in _DETERMINISTIC_FILES:
        a, b = (tmp_path / name / str(STEPS) / rel for name in ("a", "b"))
        if rel == "state/array_metadatas/process_0" and not a.exists():
            continue  # older orbax versions write no per-process array metadata
        assert a.read_bytes() == b.read_bytes(), rel
    assert os.path.exists(tmp_path / "a" / str(STEPS) / "state" / "manifest.ocdbt")
