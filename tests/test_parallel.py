"""Tests of the data-parallel plumbing on eight virtual CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdiff import parallel


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh()


def test_mesh_spans_all_devices(mesh):
    assert jax.device_count() == 8
    assert mesh.axis_names == ("data",)
    assert mesh.shape == {"data": 8}
    assert parallel.batch_sharding(mesh).spec == P("data")
    assert parallel.replicated_sharding(mesh).spec == P()


def test_sharded_sum_equals_unsharded(mesh):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4, 4, 1)).astype(np.float32)
    w = rng.normal(size=(4, 4, 1)).astype(np.float32)
    batch = parallel.shard_batch(mesh, {"image": x})
    params = parallel.replicate(mesh, {"w": w})
    assert batch["image"].sharding.spec == P("data")
    assert len(batch["image"].addressable_shards) == 8
    assert batch["image"].addressable_shards[0].data.shape == (2, 4, 4, 1)
    assert params["w"].sharding.is_fully_replicated

    @jax.jit
    def loss(params, batch):
        return jnp.sum(jnp.tanh(batch["image"] * params["w"]) ** 2)

    sharded = loss(params, batch)
    reference = loss({"w": jnp.asarray(w)}, {"image": jnp.asarray(x)})
    np.testing.assert_allclose(sharded, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(batch["image"]), x, rtol=0, atol=0)


def test_bad_batch_size_raises(mesh):
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        parallel.shard_batch(mesh, np.zeros((12, 2), np.float32))
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        parallel.check_batch_size(7, mesh)
    assert parallel.check_batch_size(64, mesh) == 64


def test_initialize_distributed_single_process_is_noop():
    parallel.initialize_distributed(num_processes=1)
    assert jax.process_count() == 1
