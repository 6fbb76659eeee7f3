"""Runs that lose nothing: faults injected into real work directories, with the scripts as real processes.

Each test names the fault it injects. One tiny two-moons run (four steps, checkpoints at 2 and 4) is trained once
for the module and copied for every test that damages it. The scripts run with one CPU device, as a user's would.
Tests that need a read-only or full disk mount a tmpfs (root only; skipped otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdiff.checkpoint import Checkpointer
from tests.helpers import corrupt_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
CONFIG = os.path.join(EXPERIMENTS, "configs", "toy_vp_mlp.py")
# The run every test starts from; a rerun with these arguments is "the same command".
ARGS = [
    f"--config={CONFIG}",
    "--config.training.n_iters=4",
    "--config.training.save_every=2",
    "--config.training.keep=3",
    "--config.training.log_every=1",
    "--config.training.batch_size=16",
    "--config.model.hidden_sizes=(16,16)",
    "--config.sampling.steps=3",
    "--config.eval.enabled=False",
]
# A short end-of-run evaluation for the runs that have one.
EVAL = [
    "--config.eval.enabled=True",
    "--config.eval.num_samples=40",
    "--config.eval.likelihood_examples=16",
    "--config.eval.density_grid=0",
]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device
    return env


STARTED: list[subprocess.Popen] = []


def start(script, *args):
    cmd = [sys.executable, os.path.join(EXPERIMENTS, script), *map(str, args)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    STARTED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_stray_processes():
    """A test that fails half-way leaves no script running (or stopped) behind."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def run(script, *args, timeout=240):
    proc = start(script, *args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def assert_one_line(code, err, *needles, expected_code=2):
    assert code == expected_code, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def leaves(workdir, step):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    trees = [ckpt.restore_params(step, name=name) for name in ("params", "ema_params")]
    out = [np.asarray(x) for tree in trees for x in jax.tree.leaves(tree)]
    ckpt.close()
    return out


def snapshot(workdir):
    """Every file of a work directory with its bytes."""
    files = {}
    for root, _, names in os.walk(workdir):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                files[os.path.relpath(p, workdir)] = f.read()
    return files


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained") / "run"
    code, out, err = run("train.py", f"--workdir={workdir}", *ARGS)
    assert code == 0, err[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    return workdir


@pytest.fixture
def copy(trained, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(trained, dest)
    return dest


@contextlib.contextmanager
def mounted(path, options):
    """A tmpfs (or a read-only bind mount) at ``path``; skips the test where mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if options == "ro-bind":
        cmds = [["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,ro,bind", str(path)]]
    else:
        cmds = [["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]]
    for cmd in cmds:
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(path)], capture_output=True)
            pytest.skip(f"cannot mount here: {' '.join(cmd)}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- 1, 4, 12: newest checkpoint corrupt, the same command rerun ---------------------------------------------------
def test_corrupt_newest_is_moved_aside_and_the_rerun_equals_the_uninterrupted_run(trained, copy):
    corrupt_checkpoint(copy / "checkpoints" / "4")
    code, out, err = run("train.py", f"--workdir={copy}", *ARGS)
    assert code == 0, err[-3000:]
    # Reported, moved aside (never deleted), and the final step saved again (1).
    assert "checkpoint 4 is unreadable" in out and "corrupt-4" in out, out
    assert sorted(os.listdir(copy / "checkpoints")) == ["2", "4", "corrupt-4"]
    # State, data position and random stream all came from checkpoint 2 (4): bitwise the uninterrupted run.
    assert "resumed from checkpoint 2" in out and "(step 2, data position: epoch 0, batch 2)" in out, out
    for a, b in zip(leaves(copy, 4), leaves(trained, 4), strict=True):
        np.testing.assert_array_equal(a, b)
    assert Checkpointer(copy / "checkpoints").metadata(4)["data"]["step"] == 4


# -- 2, 6: resuming with a config that changes the run --------------------------------------------------------
def test_changed_config_is_refused_before_anything_is_written(copy):
    before = snapshot(copy)
    changes = [
        "--config.model.embedding_size=64",
        "--config.training.batch_size=32",
        "--config.seed=7",
        "--config.sde.name=subvpsde",
    ]
    code, out, err = run("train.py", f"--workdir={copy}", *ARGS, *changes)
    assert_one_line(code, err, "model.embedding_size: 32 -> 64", "training.batch_size: 16 -> 32",
                    "seed: 0 -> 7", "sde.name: 'vpsde' -> 'subvpsde'")  # fmt: skip
    assert snapshot(copy) == before  # config.json, checkpoints and metrics untouched, no lock left
    # A documented safe change (longer run, other logging and evaluation) resumes.
    code, out, err = run("train.py", f"--workdir={copy}", *ARGS, "--config.training.n_iters=6",
                         "--config.training.log_every=2", "--config.sampling.steps=5")  # fmt: skip
    assert code == 0, err[-3000:]
    assert json.loads((copy / "config.json").read_text())["training"]["n_iters"] == 6


# -- 3, 12, 13: metrics.jsonl removed and rotated during a run; no terminal; the summary's protocol ---------------
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A run whose metrics.jsonl is deleted, then rotated, while it trains (paused with SIGSTOP to do it)."""
    workdir = tmp_path_factory.mktemp("evaluated") / "run"
    args = [*ARGS, *EVAL, "--config.training.n_iters=3000", "--config.training.log_every=50",
            "--config.training.save_every=1000", "--config.training.progress_bar=True"]  # fmt: skip
    proc = start("train.py", f"--workdir={workdir}", *args)
    log = workdir / "metrics.jsonl"

    def pause_when(ok):
        deadline = time.time() + 180
        while not ok():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.005)
        proc.send_signal(signal.SIGSTOP)

    pause_when(lambda: log.exists() and log.read_text().count("\n") >= 1)
    deleted_rows = log.read_text().count("\n")
    os.remove(log)
    proc.send_signal(signal.SIGCONT)
    pause_when(lambda: log.exists() and log.read_text().count("\n") >= 1)
    os.rename(log, workdir / "metrics.jsonl.1")
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=240)
    return dict(workdir=workdir, code=proc.returncode, out=out, err=err, deleted_rows=deleted_rows)


def test_metrics_survive_deletion_and_rotation_and_evaluate_repeats_the_summary(evaluated):
    workdir = evaluated["workdir"]
    assert evaluated["code"] == 0, evaluated["err"][-3000:]
    # 3: the rows after the deletion and after the rotation went to a new metrics.jsonl; the summary was written.
    rotated = [json.loads(x) for x in (workdir / "metrics.jsonl.1").read_text().splitlines()]
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rotated and rows and rows[-1]["step"] == 3000
    assert rotated[-1]["step"] < rows[0]["step"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_loss"] == pytest.approx(rows[-1]["loss"], abs=1e-4)
    assert (workdir / "loss.png").is_file()
    # 12: without a terminal, no carriage-return progress bar but a plain line per log interval.
    assert "\r" not in evaluated["err"] and "\r" not in evaluated["out"]
    assert "step 50/3000  loss " in evaluated["out"] and "step 3000/3000  loss " in evaluated["out"]
    # 13: evaluate.py without flags is the summary's protocol: same counts, same samples, same numbers.
    code, out, err = run("evaluate.py", f"--workdir={workdir}")
    assert code == 0, err[-3000:]
    result = json.loads((workdir / "eval.json").read_text())
    for key in ("num_samples", "likelihood_examples", "sampler", "sampler_steps", "sampler_nfe", "seed",
                "test_nll_nats"):  # fmt: skip
        assert result[key] == summary[key], key
    assert summary["num_samples"] == 40 and summary["likelihood_examples"] == 16
    # 9: the adaptive ODE sampler from the command line (no step count passed to it).
    code, out, err = run("evaluate.py", f"--workdir={workdir}", "--sampler=ode", "--num_samples=4",
                         "--likelihood_examples=2")  # fmt: skip
    assert code == 0, err[-3000:]
    result = json.loads((workdir / "eval.json").read_text())
    assert result["sampler"] == "ode" and result["sampler_steps"] is None and result["sampler_nfe"] > 10


# -- 5: every checkpoint unreadable -----------------------------------------------------------------------------
def test_all_checkpoints_unreadable_is_refused_unless_restart(copy):
    corrupt_checkpoint(copy / "checkpoints" / "2")
    corrupt_checkpoint(copy / "checkpoints" / "4")
    before = snapshot(copy)
    code, out, err = run("train.py", f"--workdir={copy}", *ARGS)
    assert_one_line(code, err, "every checkpoint", "2 (", "4 (", "--restart")
    assert snapshot(copy) == before  # nothing moved, nothing rewritten
    code, out, err = run("train.py", f"--workdir={copy}", *ARGS, "--restart")
    assert code == 0, err[-3000:]
    names = sorted(os.listdir(copy / "checkpoints"))
    assert names == ["2", "4", "corrupt-2", "corrupt-4"]
    kept = [n for n in os.listdir(copy) if n.startswith("metrics-before-restart-")]
    assert len(kept) == 1 and (copy / kept[0]).read_bytes() == before["metrics.jsonl"]
    assert [json.loads(x)["step"] for x in (copy / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# -- 7: non-finite parameters and outputs are refused, never reported ---------------------------------------------
def _poisoned(copy, value):
    """Saves checkpoint 6: checkpoint 4 with every EMA parameter set to ``value``."""
    sys.path.insert(0, EXPERIMENTS)
    try:
        import common
    finally:
        sys.path.remove(EXPERIMENTS)
    from ml_collections import ConfigDict

    from jaxdiff.train import create_train_state

    config = ConfigDict(json.loads((copy / "config.json").read_text()))
    model, tx = common.build_model(config), common.build_optimizer(config)
    state = create_train_state(jax.random.key(0), model, jax.ShapeDtypeStruct((16, 2), np.float32), tx)
    ckpt = Checkpointer(copy / "checkpoints", async_save=False)
    found = ckpt.restore_newest(state)
    bad = found.value.replace(ema_params=jax.tree.map(lambda p: p * 0 + value, found.value.ema_params))
    ckpt.save(6, bad, metadata=found.metadata)
    ckpt.close()


@pytest.mark.parametrize("value", [float("nan"), 1e30])
def test_non_finite_parameters_or_samples_are_refused(copy, value):
    _poisoned(copy, value)
    code, out, err = run("sample.py", f"--workdir={copy}", "--n=8", "--out", copy / "s")
    needle = "EMA parameter values are not finite" if np.isnan(value) else "samples are not finite"
    assert_one_line(code, err, needle, expected_code=3)
    assert not (copy / "s.npz").exists()
    if np.isnan(value):
        code, out, err = run("evaluate.py", f"--workdir={copy}", "--num_samples=8", "--likelihood_examples=4")
        assert_one_line(code, err, "not finite", expected_code=3)
        assert not (copy / "eval.json").exists()


# -- 8: two writers on one work directory; a stale lock --------------------------------------------------------
def test_one_writer_per_workdir_and_a_stale_lock_is_taken_over(copy):
    first = start("train.py", f"--workdir={copy}", *ARGS, "--config.training.n_iters=1000000")
    lock = copy / "lock"
    deadline = time.time() + 120
    while not (lock.exists() and f'"pid": {first.pid}' in lock.read_text()):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.05)
    code, out, err = run("train.py", f"--workdir={copy}", *ARGS, "--config.training.n_iters=1000000")
    assert_one_line(code, err, f"in use by PID {first.pid} on ", "started ")
    assert first.poll() is None  # the first one goes on
    first.send_signal(signal.SIGKILL)  # leaves its lock file behind
    first.communicate(timeout=60)
    assert lock.exists()
    code, out, err = run("train.py", f"--workdir={copy}", *ARGS)  # already past step 4: nothing to train
    assert code == 0, err[-3000:]
    assert f"took over the stale lock of PID {first.pid}" in out, out
    assert not lock.exists()


# -- 9, 10: sampling: the ODE, batches, output paths, fallbacks -----------------------------------------------------
def test_sample_ode_in_batches(copy):
    code, out, err = run("sample.py", f"--workdir={copy}", "--method=ode", "--n=20", "--batch_size=8",
                         "--out", copy / "ode")  # fmt: skip
    assert code == 0, err[-3000:]
    drawn = np.load(copy / "ode.npz")
    assert drawn["samples"].shape == (20, 2) and np.all(np.isfinite(drawn["samples"]))
    assert int(drawn["batch_size"]) == 8 and int(drawn["nfe"]) > 10
    assert not (copy / "ode.partial.npy").exists()
    code, out, err = run("sample.py", f"--workdir={copy}", "--method=ode", "--steps=5")
    assert_one_line(code, err, "--steps 5", "adaptive")


def test_sample_falls_back_from_a_corrupt_checkpoint_and_a_torn_config(copy):
    corrupt_checkpoint(copy / "checkpoints" / "4")
    config = (copy / "config.json").read_text()
    (copy / "config.json").write_text(config[: len(config) // 2])
    code, out, err = run("sample.py", f"--workdir={copy}", "--n=4", "--out", copy / "s")
    assert code == 0, err[-3000:]
    assert "checkpoint 4" in out and "unreadable" in out and "using checkpoint 2" in out, out
    assert "config.json is unreadable" in out and "saved with checkpoint 2" in out, out
    assert int(np.load(copy / "s.npz")["step"]) == 2
    assert sorted(os.listdir(copy / "checkpoints")) == ["2", "4"]  # a reader moves nothing


def test_output_problems_are_one_line_before_sampling(copy, tmp_path):
    code, out, err = run("sample.py", f"--workdir={copy}", "--n=4", "--out", tmp_path / "missing" / "s")
    assert_one_line(code, err, "--out", "does not exist")
    (tmp_path / "file").write_text("x")
    code, out, err = run("train.py", f"--workdir={tmp_path / 'file'}", *ARGS)
    assert_one_line(code, err, "--workdir", "is a file")


def test_read_only_workdir(copy, tmp_path):
    with mounted(copy, "ro-bind"):
        before = snapshot(copy)
        code, out, err = run("train.py", f"--workdir={copy}", *ARGS, "--config.training.n_iters=6")
        assert_one_line(code, err, "--workdir", "Read-only file system")
        code, out, err = run("sample.py", f"--workdir={copy}", "--n=4")  # default output inside the workdir
        assert_one_line(code, err, "--workdir", "Read-only file system")
        code, out, err = run("sample.py", f"--workdir={copy}", "--n=4", "--out", tmp_path / "s")
        assert code == 0, err[-3000:]  # reading a run needs no write access
        assert snapshot(copy) == before


def test_full_disk_is_refused_before_work(copy, tmp_path):
    with mounted(tmp_path / "small", "size=1m"):
        code, out, err = run("train.py", f"--workdir={tmp_path / 'small' / 'run'}", *ARGS)
        assert_one_line(code, err, "free on that disk")
        code, out, err = run("sample.py", f"--workdir={copy}", "--n=10000000", "--out", tmp_path / "small" / "s")
        assert_one_line(code, err, "--n 10000000 samples needs about", "free on that disk")


# -- 11: the messages of everyday mistakes ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "script, args, needles",
    [
        ("train.py", ["--config", CONFIG, "--config.training.n_iter=3"],
         ["unknown config key training.n_iter", "did you mean training.n_iters?"]),
        ("train.py", ["--config", "/no/such/config.py"], ["--config /no/such/config.py: no such file"]),
        ("evaluate.py", ["--config", CONFIG], ["--config: evaluate.py reads the run's config", "--workdir alone"]),
        ("evaluate.py", ["--num_samples=0"], ["--num_samples must be >= 2", "got 0"]),
    ],
)  # fmt: skip
def test_everyday_mistakes_are_one_clear_line(tmp_path, script, args, needles):
    code, out, err = run(script, f"--workdir={tmp_path}", *args)
    assert_one_line(code, err, *needles)
    assert "\\n" not in err and "\\'" not in err


# -- slow: the disk fills up during a run; an interrupted long sampling run continues ----------------------------
@pytest.mark.slow
def test_disk_full_during_a_run_keeps_the_older_checkpoints(tmp_path):
    with mounted(tmp_path / "disk", "size=16m"):
        workdir = tmp_path / "disk" / "run"
        proc = start("train.py", f"--workdir={workdir}", *ARGS, "--config.training.n_iters=1000000",
                     "--config.training.save_every=200", "--config.training.keep=3")  # fmt: skip
        deadline = time.time() + 120
        while not (workdir / "checkpoints" / "400").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        with open(tmp_path / "disk" / "filler", "wb") as f:  # fill the disk
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
        out, err = proc.communicate(timeout=240)
        assert proc.returncode not in (0, None)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err[-3000:]
        assert "No space left on device" in err and "files written before are kept" in err, err
        good = [s for s in Checkpointer(workdir / "checkpoints").all_steps() if s <= 400]
        assert good and leaves(workdir, good[-1])


@pytest.mark.slow
def test_interrupted_sampling_continues_from_its_partial_file(copy):
    args = [f"--workdir={copy}", "--n=3000000", "--batch_size=1000", "--out", copy / "big"]
    proc = start("sample.py", *args)
    meta = copy / "big.partial.json"
    deadline = time.time() + 120
    while not (meta.exists() and json.loads(meta.read_text())["done"] >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done = json.loads(meta.read_text())["done"]
    partial = np.load(copy / "big.partial.npy", mmap_mode="r")
    assert np.all(np.isfinite(partial[: done * 1000])) and np.any(partial[: done * 1000] != 0)
    proc = start("sample.py", *args)
    line = proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert line.startswith("continuing ") and f"{done} of 3000 batches done" in line, line


@pytest.mark.slow
def test_progress_bar_only_on_a_terminal(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    master, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    extra = ["--config.training.n_iters=200", "--config.training.log_every=50", "--config.training.progress_bar=True"]
    cmd = [sys.executable, os.path.join(EXPERIMENTS, "train.py"), f"--workdir={tmp_path / 'run'}", *ARGS, *extra]
    proc = subprocess.Popen(cmd, env=_env(), stdout=child, stderr=child, cwd=ROOT)
    os.close(child)
    out = b""
    with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
        while chunk := os.read(master, 65536):
            out += chunk
    assert proc.wait(timeout=240) == 0, out[-3000:]
    text = out.decode(errors="replace")
    assert "\r" in text and "step/s" in text  # tqdm's bar
    assert "step 50/200  loss" not in text  # no plain lines on a terminal


@pytest.mark.slow
def test_summary_and_evaluate_agree_on_sample_quality(tmp_path):
    # 13: the same checkpoint, the same FID / KID from the end-of-training summary and from evaluate.py.
    workdir = tmp_path / "digits"
    config = os.path.join(EXPERIMENTS, "configs", "digits_vp_ddpmpp.py")
    args = [f"--config={config}", "--config.training.n_iters=2", "--config.training.batch_size=16",
            "--config.model.nf=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
            "--config.sampling.steps=3", "--config.eval.num_samples=64", "--config.eval.likelihood_examples=8",
            "--config.eval.ode_tol=0.01", "--config.eval.quality=True"]  # fmt: skip
    code, out, err = run("train.py", f"--workdir={workdir}", *args, timeout=600)
    assert code == 0, err[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    code, out, err = run("evaluate.py", f"--workdir={workdir}", timeout=600)
    assert code == 0, err[-3000:]
    result = json.loads((workdir / "eval.json").read_text())
    for key in ("num_samples", "num_reference", "kid_subset_size", "fid", "kid_mean", "kid_std", "test_bits_per_dim"):
        assert result[key] == summary[key], key
    assert summary["num_samples"] == 64 and summary["kid_subset_size"] == 32 and summary["kid_std"] > 0
