"""Trains a score network, then evaluates it (samples, bits/dim, sample quality).

    python experiments/train.py --config experiments/configs/digits_vp_ddpmpp.py --workdir runs/digits
    python experiments/train.py --config experiments/configs/toy_vp_mlp.py --workdir runs/toy \
        --config.training.n_iters=2000

Writes ``WORKDIR/config.json``, ``checkpoints/`` (resumed from the newest on start, the data order included),
``metrics.jsonl`` (step, loss, grad_norm, lr, steps/s) and, after the last step (see the config's ``eval``
section), ``loss.png``, ``samples.png``, ``summary.json`` and a summary table.

Runs that survive: SIGTERM or SIGINT (preemption, Ctrl-C) saves a checkpoint of the current step and exits
with ``128 + signal``; after a SIGKILL the next start resumes from the newest complete checkpoint, with the data
order and the random stream continuing, so the parameters equal an uninterrupted run's bit for bit on CPU. A
step with a non-finite loss or gradient never updates the parameters (the train step skips it); with
``--nonfinite=stop`` (the default) the run then saves the last good state and exits with code 3, naming the step;
with ``--nonfinite=skip`` it counts such steps (``skipped`` in ``metrics.jsonl``) and goes on.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import common
import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags
from tqdm import tqdm

from jaxdiff.checkpoint import Checkpointer
from jaxdiff.parallel import make_mesh, shard_batch
from jaxdiff.train import create_train_state, make_train_step

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (experiments/configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "output directory (created; an existing run is resumed)")
flags.DEFINE_enum("nonfinite", "stop", ["stop", "skip"], "on a non-finite loss or gradient: stop, or skip the step")


class Stop(Exception):
    """Ends training early with an exit code, after the last good state has been checkpointed."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _signals_to_flag():
    """SIGTERM/SIGINT set a flag that the loop checks after every step (never interrupting a save)."""
    received = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    return received


def train(config, workdir: str, nonfinite: str = "stop"):
    """Runs ``config.training.n_iters`` steps from the newest checkpoint in ``workdir``; returns the state."""
    sde, model = common.build_sde(config), common.build_model(config)
    data = common.build_dataset(config, "train")
    t = config.training
    mesh = make_mesh() if jax.device_count() > 1 else None  # data parallel over every device
    tx = common.build_optimizer(config)
    sample = jax.ShapeDtypeStruct((t.batch_size, *data.info.shape), jnp.float32)
    state = create_train_state(jax.random.key(config.seed), model, sample, tx, mesh=mesh)
    step_fn = make_train_step(common.build_loss_fn(config, sde, model), tx, ema_rate=config.model.ema_rate, mesh=mesh)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=t.save_every, keep=t.keep)
    state = ckpt.restore_latest(state)
    start = int(state.step)
    if start:
        data.restore(ckpt.metadata()["data"])  # the data order continues where it stopped
    keys = ["x", "label"] if getattr(model, "num_classes", None) is not None else ["x"]
    put = (lambda b: shard_batch(mesh, b)) if mesh is not None else (lambda b: jax.tree.map(jnp.asarray, b))

    received = _signals_to_flag()
    bar = tqdm(total=t.n_iters, initial=start, unit="step", dynamic_ncols=True, disable=not t.progress_bar)
    pending, tick, tick_step = [], time.perf_counter(), start
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as log:
        for step in range(start + 1, t.n_iters + 1):
            batch = next(data)
            state, metrics = step_fn(state, put({k: batch[k] for k in keys}))
            pending.append(metrics)
            bar.update(1)
            if step % t.log_every == 0 or step == t.n_iters:
                pending = jax.device_get(pending)  # one host round trip per log interval
                now = time.perf_counter()
                bad = [step - len(pending) + 1 + i for i, m in enumerate(pending) if not m["finite"]]
                if bad and nonfinite == "stop":
                    # The bad steps changed nothing: the state is the last good one. Keep it and stop.
                    ckpt.save(step, state, metadata={"data": data.state})
                    ckpt.close()
                    raise Stop(f"non-finite loss or gradient at step {bad[0]}; last good state saved as "
                               f"checkpoint {step} in {ckpt.directory}", 3)  # fmt: skip
                row = dict(step=step, loss=float(sum(m["loss"] for m in pending) / len(pending)),
                           grad_norm=float(pending[-1]["grad_norm"]), lr=float(pending[-1]["learning_rate"]),
                           steps_per_s=round((step - tick_step) / (now - tick), 3),
                           skipped=int(state.skipped))  # fmt: skip
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['loss']:.4g}")
                pending, tick, tick_step = [], now, step
            if ckpt.should_save(step) or step == t.n_iters or received:
                ckpt.save(step, state, metadata={"data": data.state})
            if received:
                bar.close()
                ckpt.close()
                raise Stop(f"stopped by signal {received[0]} at step {step}; checkpoint saved in {ckpt.directory}",
                           128 + received[0])  # fmt: skip
    bar.close()
    ckpt.close()
    return state


def main(argv):
    common.parse_flags(argv)
    config = common.validate(FLAGS.config)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))
    t0 = time.perf_counter()
    try:
        state = train(config, FLAGS.workdir, FLAGS.nonfinite)
    except Stop as stop:
        print(stop, file=sys.stderr)
        return stop.code
    train_s = time.perf_counter() - t0
    if config.eval.enabled:
        summary = common.evaluate(config, FLAGS.workdir, state.ema_params, step=int(state.step))
        summary["train_s"] = round(train_s, 1)
        common.write_summary(FLAGS.workdir, summary)


if __name__ == "__main__":
    sys.exit(common.run_main(main))
