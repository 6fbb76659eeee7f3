"""Tests of the data-parallel plumbing on eight virtual CPU devices."""

import os

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


_WORKER = """
import os, sys
import os

import jax
from jaxdiff import data, parallel
parallel.initialize_distributed(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp
mesh = parallel.make_mesh()
it = data.get_dataset("digits", batch_size=8, seed=0, random_flip=True)
batch = parallel.shard_batch(mesh, next(it))
total = jax.jit(lambda b: jnp.sum(b["x"] * jnp.arange(8.0)[:, None, None, None]))(batch)
print("RESULT", jax.process_count(), jax.device_count(), it.local_batch_size, float(total))
"""


@pytest.mark.slow
def test_two_processes_on_cpu_match_one(tmp_path):
    """Two CPU processes (gloo) with two devices each see the single-process global batch."""
    import socket
    import subprocess
    import sys

    from jaxdiff import data

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"localhost:{port}", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lines = [line for out in outs for line in out.splitlines()]
    results = [line.split()[1:] for line in lines if line.startswith("RESULT")]
    assert len(results) == 2, outs
    x = data.get_dataset(
        "digits", batch_size=8, seed=0, random_flip=True, process_index=0, process_count=1
    ).batch(0)["x"]
    expected = float(np.sum(x * np.arange(8.0)[:, None, None, None]))
    for n_proc, n_dev, local, total in results:
        assert (int(n_proc), int(n_dev), int(local)) == (2, 4, 4)
        np.testing.assert_allclose(float(total), expected, rtol=1e-5, atol=1e-4)
