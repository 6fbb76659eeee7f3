"""``experiments/train.py``'s start-up options: several steps per call, and the persistent compilation cache.

Each run is a subprocess (as in ``test_experiments.py``) of the toy config, six steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")
# Six steps, logged every third and saved at the end: with two steps per call the run mixes scanned pairs
# and single steps (a pair may not straddle step 3).
ARGS = [
    f"--config={os.path.join(ROOT, 'experiments', 'configs', 'toy_vp_mlp.py')}",
    "--config.training.n_iters=6",
    "--config.training.batch_size=16",
    "--config.training.log_every=3",
    "--config.training.save_every=6",
    "--config.training.progress_bar=False",
    "--config.model.hidden_sizes=(16,16)",
    "--config.eval.enabled=False",
]


def _train(workdir, cache, *extra):
    env = dict(os.environ, JAXDIFF_COMPILATION_CACHE_MIN_SECS="0")  # keep every program, however quick
    proc = subprocess.run(
        [sys.executable, TRAIN, *ARGS, f"--workdir={workdir}", f"--compilation_cache={cache}", *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_steps_per_call_and_the_compilation_cache(tmp_path):
    cache = tmp_path / "xla"
    scanned = _train(tmp_path / "scanned", cache, "--config.training.steps_per_call=2")
    kept = {name for name in os.listdir(cache) if name.endswith("-cache")}
    programs = sorted(name.split("-")[0] for name in kept)
    # The initialiser, and the train step with one and with two steps per call (sharded over the 8 devices of
    # tests/conftest.py, hence the name of the wrapper the steps are jitted as).
    assert programs.count("jit_init") == 1 and programs.count("jit_body") == 2, programs
    single = _train(tmp_path / "single", cache)
    # Two steps per call take the same steps: the same losses at the logged steps.
    assert [r["step"] for r in scanned] == [r["step"] for r in single] == [3, 6]
    for a, b in zip(scanned, single, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]) and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4
    # Every program of the second run was found under a key the first run stored: nothing new was kept.
    again = {name for name in os.listdir(cache) if name.endswith("-cache")}
    assert again == kept, sorted(again - kept)


def test_steps_per_call_is_checked_before_the_workdir_is_touched(tmp_path):
    proc = subprocess.run(
        [sys.executable, TRAIN, *ARGS, f"--workdir={tmp_path / 'w'}", "--config.training.steps_per_call=0"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "config.training.steps_per_call: must be an integer >= 1, got 0" in proc.stderr
    assert not (tmp_path / "w").exists()
