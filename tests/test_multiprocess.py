"""A real two-process training run on CPU (gloo) against one process driving the same four devices.

Two copies of ``tests/mp_train_worker.py`` run on this machine, each with two virtual CPU devices, joined
by ``jaxdiff.parallel.initialize_distributed`` on localhost. They train a small MLP score model for five
data-parallel steps on ``gaussian_grid``, each feeding its own half of every global batch, and write a
checkpoint together. Here the same steps run in this process on four of its devices, and the checkpoint
is restored into a single-device state.
"""

import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import parallel, train
from jaxdiff.checkpoint import Checkpointer
from tests import mp_train_worker as worker

STEPS = 5
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 300  # the run takes ~40 CPU-seconds; this bound only guards against a hang on a loaded machine
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Not bitwise: the gradient (and loss) mean is an all-reduce whose summation order differs between four
# devices in one process and two gloo processes of two devices each, so results agree to float32 rounding.
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, env.get("PYTHONPATH", "")] if p)
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(NUM_PROCESSES):
        log = open(workdir / f"log_{i}.txt", "w")  # a file, not a pipe: a full pipe would block a worker
        cmd = [sys.executable, os.path.join(ROOT, "tests", "mp_train_worker.py"), "--coordinator", address]
        cmd += ["--num-processes", str(NUM_PROCESSES), "--process-id", str(i), "--workdir", str(workdir)]
        cmd += ["--steps", str(STEPS), "--init-timeout", "60"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        log.close()
    return procs


def _wait(procs, workdir) -> None:
    """Waits for every worker; on a failure or the deadline, kills the rest and reports the logs."""
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = True
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes) or all(c == 0 for c in codes):
                timed_out = False
                break
            time.sleep(0.2)
    finally:
        _kill(procs)
    codes = [p.returncode for p in procs]
    if any(codes):
        logs = "\n".join(
            f"--- process {i} (exit {c}) ---\n" + _tail(workdir / f"log_{i}.txt") for i, c in enumerate(codes)
        )
        what = f"timed out after {TIMEOUT_S} s" if timed_out else "failed"
        pytest.fail(f"multi-process run {what}:\n{logs}")


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _tail(path, lines: int = 30) -> str:
    text = [line for line in path.read_text(errors="replace").splitlines() if not line.startswith("[Gloo]")]
    return "\n".join(text[-lines:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-process run (its directory) and the single-process reference on four devices."""
    workdir = tmp_path_factory.mktemp("multiprocess")
    procs = _launch(workdir)
    try:
        # The reference is computed while the workers run.
        mesh = parallel.make_mesh(devices=jax.devices()[: NUM_PROCESSES * DEVICES_PER_PROCESS])
        state, losses, _ = worker.run(mesh, STEPS, process_index=0, process_count=1)
        reference = {"state": jax.device_get(state), "losses": np.asarray(jnp.stack(losses))}
    except BaseException:
        _kill(procs)
        raise
    _wait(procs, workdir)
    return workdir, reference


def _load(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_two_processes_train_like_one(runs, initial_state):
    workdir, reference = runs
    results = [_load(workdir / f"result_{i}.npz") for i in range(NUM_PROCESSES)]
    for r in results:
        assert int(r["process_count"]) == NUM_PROCESSES
        assert int(r["device_count"]) == NUM_PROCESSES * DEVICES_PER_PROCESS
        assert int(r["local_device_count"]) == DEVICES_PER_PROCESS
        assert int(r["local_batch"]) == worker.GLOBAL_BATCH // NUM_PROCESSES
    # The replicated state is the same, bit for bit, on both processes.
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        np.testing.assert_array_equal(results[0][k], results[1][k], err_msg=k)

    got = results[0]
    assert got["losses"].shape == (STEPS,)
    np.testing.assert_allclose(got["losses"], reference["losses"], rtol=RTOL, atol=ATOL)
    ref_params = worker.flat(reference["state"].params)
    ref_ema = worker.flat(reference["state"].ema_params)
    assert {k for k in got if k.startswith("params/")} == {"params/" + k for k in ref_params}
    for k, v in ref_params.items():
        np.testing.assert_allclose(got["params/" + k], v, rtol=RTOL, atol=ATOL, err_msg=k)
    for k, v in ref_ema.items():
        np.testing.assert_allclose(got["ema_params/" + k], v, rtol=RTOL, atol=ATOL, err_msg=k)
    # Training moved the parameters (so the comparison above is not of two initial states).
    init = jax.device_get(initial_state.params)
    moved = [np.max(np.abs(got["params/" + k] - v)) for k, v in worker.flat(init).items()]
    assert max(moved) > 1e-3


@pytest.fixture(scope="module")
def initial_state():
    """The state both runs start from, on one device (also the restore target)."""
    model, tx, _ = worker.build(None)
    sample = jnp.zeros((worker.GLOBAL_BATCH, 2))
    return train.create_train_state(jax.random.key(worker.SEED), model, sample, tx)


def test_two_process_checkpoint_restores_in_one_process(runs, initial_state):
    workdir, reference = runs
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        assert ckpt.all_steps() == [STEPS]
        assert ckpt.metadata()["data"]["step"] == STEPS
        restored = ckpt.restore(initial_state)
    finally:
        ckpt.close()
    assert int(restored.step) == STEPS
    assert int(restored.skipped) == 0
    # Bit for bit what the two processes held ...
    got = _load(workdir / "result_0.npz")
    for k, v in worker.flat(jax.device_get(restored.params)).items():
        np.testing.assert_array_equal(v, got["params/" + k], err_msg=k)
    for k, v in worker.flat(jax.device_get(restored.ema_params)).items():
        np.testing.assert_array_equal(v, got["ema_params/" + k], err_msg=k)
    # ... and, to the all-reduce's rounding, the whole single-process state (optimiser moments included).
    ref = reference["state"]
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(ref.key))
    for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(ref.opt_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)
