"""Runs that survive: real training processes killed (SIGKILL), preempted (SIGTERM) and diverging.

Each test runs ``experiments/train.py`` as a subprocess on the 2-D toy config and compares the final checkpoint
with an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdiff.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_ITERS = 300
ARGS = [
    "--config",
    os.path.join(ROOT, "experiments", "configs", "toy_vp_mlp.py"),
    f"--config.training.n_iters={N_ITERS}",
    "--config.training.save_every=20",
    "--config.training.log_every=10",
    "--config.training.batch_size=64",
    "--config.training.progress_bar=False",
    "--config.eval.enabled=False",
]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as in the uninterrupted run
    return env


def _start(workdir, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--workdir", str(workdir), *ARGS, *extra]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(workdir, *extra, timeout=240):
    proc = _start(workdir, *extra)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _final(workdir, step=None):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step() if step is None else step
    leaves = [
        np.asarray(leaf)
        for name in ("params", "ema_params")
        for leaf in jax.tree.leaves(ckpt.restore_params(step, name=name))
    ]
    ckpt.close()
    return step, leaves


def _assert_bitwise_equal(a, b):
    assert a[0] == b[0], f"steps differ: {a[0]} vs {b[0]}"
    assert len(a[1]) == len(b[1])
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = _run(workdir)
    assert code == 0, err[-2000:]
    return _final(workdir)


def _rows(path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    # Each run is killed at a random moment after it has logged two more rows (so it has compiled and trained, and
    # may be between steps, writing a checkpoint or a log row): by progress, not by the clock, so that a fast
    # machine cannot finish the run before the kill.
    rng = random.Random(0)
    metrics = tmp_path / "metrics.jsonl"
    kills = 0
    for _ in range(3):
        before = _rows(metrics)
        proc = _start(tmp_path)
        deadline = time.time() + 120
        while proc.poll() is None and _rows(metrics) < before + 2 and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
    assert kills == 3, "a run finished before it could be killed: make it longer"
    code, _, err = _run(tmp_path)  # resumes from the newest complete checkpoint
    assert code == 0, err[-2000:]
    _assert_bitwise_equal(_final(tmp_path), uninterrupted)


def test_sigterm_saves_a_checkpoint_and_resume_equals_uninterrupted(tmp_path, uninterrupted):
    proc = _start(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    line = [ln for ln in err.splitlines() if "stopped by signal" in ln]
    assert line, err[-2000:]
    stopped_at = int(line[0].split(" at step ")[1].split(";")[0])
    assert 0 < stopped_at < N_ITERS
    # The checkpoint of the exact step it stopped at exists (not only the last periodic one).
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == stopped_at
    code, _, err = _run(tmp_path)
    assert code == 0, err[-2000:]
    _assert_bitwise_equal(_final(tmp_path), uninterrupted)


def test_divergence_stops_with_the_last_good_state(tmp_path):
    # A huge learning rate drives the loss to inf/NaN; the run stops naming the step, and the checkpoint it
    # leaves holds finite parameters.
    code, _, err = _run(tmp_path, "--config.optim.lr=1e30", "--config.optim.grad_clip=0")
    assert code == 3, err[-2000:]
    message = [ln for ln in err.splitlines() if "non-finite loss or gradient at step" in ln]
    assert message, err[-2000:]
    step, leaves = _final(tmp_path)
    assert 0 < step < N_ITERS
    assert all(np.all(np.isfinite(x)) for x in leaves)
