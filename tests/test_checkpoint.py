"""Tests of the orbax checkpointer: round trips, keep-N, EMA restore, resharding, corrupt files."""

import logging
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff import data
from jaxdiff.checkpoint import Checkpointer, CheckpointMismatchError
from tests.helpers import corrupt_checkpoint


@flax.struct.dataclass
class TrainState:
    """Stand-in with the fields of the library's train state."""

    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: optax.OptState
    key: jax.Array


def make_state(seed=0, width=4):
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"kernel": rng.normal(size=(3, width)).astype(np.float32), "bias": np.ones(width)},
        "scale": np.float32(rng.normal()),
    }
    params = jax.tree.map(jnp.asarray, params)
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    # One real update so that the optimiser moments are non-trivial.
    grads = jax.tree.map(lambda p: jnp.sin(p + seed), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda p: 0.5 * p - 1.0, params)
    return TrainState(jnp.asarray(7 + seed), params, ema, opt_state, jax.random.key(seed + 11))


def assert_bitwise_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert y.dtype == x.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def zeros_like_state(state):
    return jax.tree.map(
        lambda x: x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.zeros_like(x),
        state,
    )


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_is_bitwise(tmp_path, async_save):
    state = make_state()
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=async_save)
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, metadata={"config": {"lr": 1e-3, "sde": "vp"}, "data": {"step": 7}})
    ckpt.wait()
    target = make_state(seed=1)  # same structure, different values and key
    restored = ckpt.restore(target)
    assert_bitwise_equal(restored, state)
    assert ckpt.metadata() == {"config": {"lr": 1e-3, "sde": "vp"}, "data": {"step": 7}}
    # The restored key is a typed key of the same implementation and draws the same numbers.
    np.testing.assert_array_equal(jax.random.normal(restored.key, (3,)), jax.random.normal(state.key, (3,)))
    ckpt.close()


def test_keep_n_deletes_only_the_oldest_and_restore_newest(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=2, keep=2, async_save=False)
    states = {}
    for step in range(1, 9):
        if ckpt.should_save(step):
            states[step] = make_state(seed=step)
            ckpt.save(step, states[step], metadata={"step": step})
    assert [s for s in range(1, 9) if ckpt.should_save(s)] == [2, 4, 6, 8]
    assert ckpt.all_steps() == [6, 8] and ckpt.latest_step() == 8
    assert sorted(os.listdir(tmp_path)) == ["6", "8"]
    target = make_state(seed=100)
    assert_bitwise_equal(ckpt.restore_latest(target), states[8])
    assert_bitwise_equal(ckpt.restore(target, step=6), states[6])
    assert ckpt.metadata(6) == {"step": 6}
    assert ckpt.save(8, states[8]) is False  # an existing step is never overwritten
    with pytest.raises(FileNotFoundError):
        ckpt.restore(target, step=4)


def test_restore_latest_without_checkpoint_returns_target(tmp_path):
    ckpt = Checkpointer(tmp_path / "empty")
    target = make_state()
    assert ckpt.restore_latest(target) is target
    assert ckpt.metadata() is None


def test_restore_ema_alone(tmp_path):
    state = make_state(seed=3)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(10, state)
    ema = ckpt.restore_ema()  # no target, no optimiser: the saved structure as nested dicts
    assert_bitwise_equal(ema, jax.tree.map(jnp.asarray, state.ema_params))
    ema_into = ckpt.restore_ema(target=jax.tree.map(jnp.zeros_like, state.ema_params))
    assert_bitwise_equal(ema_into, state.ema_params)
    assert_bitwise_equal(ckpt.restore_params(name="params"), state.params)
    with pytest.raises(KeyError, match="no field"):
        ckpt.restore_params(name="nope")


def test_shape_mismatch_names_the_parameters(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, make_state(width=4))
    with pytest.raises(CheckpointMismatchError, match=r"params/dense/kernel: checkpoint \(3, 4\)"):
        ckpt.restore(make_state(width=5))
    with pytest.raises(CheckpointMismatchError, match="ema_params/dense/bias"):
        ckpt.restore_latest(make_state(width=5))  # a mismatch is raised, never skipped
    with pytest.raises(CheckpointMismatchError, match="dense/kernel"):
        ckpt.restore_ema(target=make_state(width=5).ema_params)
    extra = make_state()
    extra = extra.replace(params={**extra.params, "new": jnp.zeros(2)})
    with pytest.raises(CheckpointMismatchError, match="params/new: in the target"):
        ckpt.restore(extra)


def test_corrupt_newest_falls_back_to_previous(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, keep=3, async_save=False)
    good, bad = make_state(seed=1), make_state(seed=2)
    ckpt.save(1, good)
    ckpt.save(2, bad)
    ckpt.close()
    corrupt_checkpoint(tmp_path / "2")
    ckpt = Checkpointer(tmp_path, keep=3, async_save=False)
    with caplog.at_level(logging.WARNING, logger="jaxdiff.checkpoint"):
        restored = ckpt.restore_latest(make_state(seed=5))
    assert_bitwise_equal(restored, good)
    warnings = [r for r in caplog.records if r.name == "jaxdiff.checkpoint"]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "checkpoint 2" in warnings[0].getMessage() and "step 1" in warnings[0].getMessage()
    assert ckpt.all_steps() == [1, 2]  # the corrupt checkpoint is reported, not deleted


def test_unfinished_write_is_not_a_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, make_state())
    # What an interrupted save leaves behind: a temporary directory that was never committed.
    os.makedirs(tmp_path / "2.orbax-checkpoint-tmp-1234" / "state")
    ckpt = Checkpointer(tmp_path, async_save=False)
    assert ckpt.all_steps() == [1]
    assert os.path.isdir(tmp_path / "2.orbax-checkpoint-tmp-1234")


def test_data_iterator_state_resumes_from_checkpoint(tmp_path):
    it = data.get_dataset("digits", batch_size=16, process_index=0, process_count=1)
    for _ in range(5):
        next(it)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(5, make_state(), metadata={"data": it.state})
    expected = next(it)
    resumed = data.get_dataset("digits", batch_size=16, process_index=0, process_count=1)
    resumed.restore(Checkpointer(tmp_path).metadata()["data"])
    np.testing.assert_array_equal(next(resumed)["x"], expected["x"])


def test_restore_across_device_counts(tmp_path):
    devices = jax.devices()
    assert len(devices) == 8
    mesh = jax.make_mesh((8,), ("data",))
    x = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    sharded = {"w": jax.device_put(x, NamedSharding(mesh, P("data"))), "key": jax.random.key(4)}
    ckpt = Checkpointer(tmp_path / "a", async_save=False)
    ckpt.save(1, sharded)
    one = jax.sharding.SingleDeviceSharding(devices[0])
    target = {"w": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), "key": jax.random.key(0)}
    restored = ckpt.restore(target)
    assert restored["w"].sharding == one
    np.testing.assert_array_equal(np.asarray(restored["w"]), x)
    assert_bitwise_equal(restored["key"], sharded["key"])

    # And back: written from one device, restored sharded over eight.
    ckpt = Checkpointer(tmp_path / "b", async_save=False)
    ckpt.save(1, {"w": jnp.asarray(x)})
    target = {"w": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P("data")))}
    restored = ckpt.restore(target)
    assert restored["w"].sharding.spec == P("data")
    assert len(restored["w"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(restored["w"]), x)


def test_restore_newest_takes_state_and_metadata_from_the_same_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3, async_save=False)
    ckpt.save(1, make_state(seed=1), metadata={"data": {"step": 1}})
    ckpt.save(2, make_state(seed=2), metadata={"data": {"step": 2}})
    ckpt.close()
    corrupt_checkpoint(tmp_path / "2")  # its metadata still reads: only the state is damaged
    ckpt = Checkpointer(tmp_path, keep=3, async_save=False)
    found = ckpt.restore_newest(make_state(seed=5))
    assert found.step == 1 and found.metadata == {"data": {"step": 1}}
    assert_bitwise_equal(found.value, make_state(seed=1))
    assert [s for s, _ in found.unreadable] == [2] and "\n" not in found.unreadable[0][1]
    assert ckpt.all_steps() == [1, 2]  # reading moves nothing
    ema = ckpt.restore_newest(read=ckpt.restore_ema)
    assert ema.step == 1 and ema.metadata == {"data": {"step": 1}}
    assert_bitwise_equal(ema.value, jax.tree.map(jnp.asarray, make_state(seed=1).ema_params))


def test_save_over_an_unreadable_step_moves_it_aside_and_writes_anew(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    ckpt.save(1, make_state(seed=1))
    ckpt.save(2, make_state(seed=2))
    ckpt.close()
    corrupt_checkpoint(tmp_path / "2")
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    assert ckpt.save(2, make_state(seed=3), metadata={"data": {"step": 2}})
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "corrupt-2"]
    assert_bitwise_equal(ckpt.restore(make_state(seed=5), 2), make_state(seed=3))
    assert ckpt.save(2, make_state(seed=4)) is False  # a readable step is never overwritten
    # Moved-aside checkpoints are never deleted: not by a second move, not by keep-last-K.
    assert ckpt.move_aside(2).endswith("corrupt-2-2")
    for step in (3, 4, 5):
        ckpt.save(step, make_state(seed=step))
    assert sorted(os.listdir(tmp_path)) == ["4", "5", "corrupt-2", "corrupt-2-2"]


def test_damaged_array_data_alone_is_unreadable(tmp_path):
    # Metadata intact, only the array bytes truncated: still detected, never restored as wrong values.
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, make_state(seed=1))
    ckpt.save(2, make_state(seed=2))
    ckpt.close()
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        if os.path.basename(root) == "d":
            for f in files:
                path = os.path.join(root, f)
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 3)
    found = Checkpointer(tmp_path, async_save=False).restore_newest(make_state(seed=5))
    assert found.step == 1 and [s for s, _ in found.unreadable] == [2]
    assert_bitwise_equal(found.value, make_state(seed=1))
