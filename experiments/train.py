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

The work directory stays whole (``experiments/workdir.py``): one ``train.py`` per directory (``WORKDIR/lock``; a
stale lock of a killed run is taken over with a note); a resume with a config that changes the run is refused
before anything is written; unreadable checkpoints are moved to ``checkpoints/corrupt-<step>`` and the run goes on
from the newest readable one (state, data position and random stream from that one checkpoint), or, if none reads,
is refused unless ``--restart``; ``metrics.jsonl`` is reopened for every row. On a terminal a progress bar shows
the steps; otherwise one plain line per log interval.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

import common
import evaluation
import jax
import jax.numpy as jnp
import numpy as np
import workdir as wd
from absl import flags
from ml_collections import config_flags
from tqdm import tqdm

from jaxdiff.checkpoint import Checkpointer
from jaxdiff.parallel import make_mesh, shard_batch
from jaxdiff.train import abstract_train_state, create_train_state, make_train_step

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (experiments/configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "output directory (created; an existing run is resumed)")
flags.DEFINE_enum("nonfinite", "stop", ["stop", "skip"], "on a non-finite loss or gradient: stop, or skip the step")
flags.DEFINE_bool("restart", False, "when every checkpoint is unreadable: move them aside and train from step 0")


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


def train(config, workdir: str, nonfinite: str = "stop", restart: bool = False):
    """Runs ``config.training.n_iters`` steps from the newest readable checkpoint in ``workdir``.

    Returns:
      ``(state, last metrics row or None)``.
    """
    sde, model = common.build_sde(config), common.build_model(config)
    data = common.build_dataset(config, "train")
    t = config.training
    mesh = make_mesh() if jax.device_count() > 1 else None  # data parallel over every device
    tx = common.build_optimizer(config)
    sample = jax.ShapeDtypeStruct((t.batch_size, *data.info.shape), jnp.float32)
    key = jax.random.key(config.seed)
    abstract = abstract_train_state(key, model, sample, tx, mesh=mesh)  # shapes only: nothing compiled yet
    loss_fn = common.build_loss_fn(config, sde, model)
    k = steps_per_call(config)
    step_fn = make_train_step(loss_fn, tx, ema_rate=config.model.ema_rate, mesh=mesh)
    multi_fn = (
        make_train_step(loss_fn, tx, ema_rate=config.model.ema_rate, mesh=mesh, steps_per_call=k) if k > 1 else None
    )
    state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract) if hasattr(x, "dtype"))
    wd.check_free_space(workdir, (t.keep + 1) * state_bytes + 10_000_000, f"keeping {t.keep} checkpoints")

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=t.save_every, keep=t.keep)
    state, start = resume(ckpt, abstract, data, workdir, restart)
    if state is None:  # a new run: only now are the parameters initialised
        state = create_train_state(key, model, sample, tx, mesh=mesh)
    keys = ["x", "label"] if getattr(model, "num_classes", None) is not None else ["x"]
    put = (lambda b: shard_batch(mesh, b)) if mesh is not None else (lambda b: jax.tree.map(jnp.asarray, b))
    put_stacked = (lambda b: shard_batch(mesh, b, batch_axis=1)) if mesh is not None else put
    metadata = lambda: {"data": data.state, "config": wd.config_dict(config)}  # noqa: E731

    received = _signals_to_flag()
    terminal = t.progress_bar and sys.stderr.isatty()  # carriage-return updates only on a terminal
    bar = tqdm(total=t.n_iters, initial=start, unit="step", dynamic_ncols=True, disable=not terminal)
    pending, tick, tick_step, row = [], time.perf_counter(), start, None
    log_path = os.path.join(workdir, "metrics.jsonl")
    step = start
    while step < t.n_iters:
        n = _chunk(step, k, t, ckpt)
        if n > 1:  # several steps in one call, up to the next log or checkpoint step
            batch = [next(data) for _ in range(n)]
            state, metrics = multi_fn(state, put_stacked({name: np.stack([b[name] for b in batch]) for name in keys}))
            pending.append(metrics)
        else:
            batch = next(data)
            state, metrics = step_fn(state, put({name: batch[name] for name in keys}))
            pending.append(jax.tree.map(lambda m: m[None], metrics))
        step += n
        bar.update(n)
        if step % t.log_every == 0 or step == t.n_iters:
            pending = _per_step(jax.device_get(pending))  # one host round trip per log interval
            now = time.perf_counter()
            bad = [step - len(pending) + 1 + i for i, m in enumerate(pending) if not m["finite"]]
            if bad and nonfinite == "stop":
                # The bad steps changed nothing: the state is the last good one. Keep it and stop.
                ckpt.save(step, state, metadata=metadata())
                ckpt.close()
                raise Stop(f"non-finite loss or gradient at step {bad[0]}; last good state saved as "
                           f"checkpoint {step} in {ckpt.directory}", 3)  # fmt: skip
            row = dict(step=step, loss=float(sum(m["loss"] for m in pending) / len(pending)),
                       grad_norm=float(pending[-1]["grad_norm"]), lr=float(pending[-1]["learning_rate"]),
                       steps_per_s=round((step - tick_step) / (now - tick), 3),
                       skipped=int(state.skipped))  # fmt: skip
            wd.append_jsonl(log_path, row)  # reopened per row: a deleted or rotated file is recreated
            if terminal:
                bar.set_postfix(loss=f"{row['loss']:.4g}")
            else:
                print(f"step {step}/{t.n_iters}  loss {row['loss']:.4g}  {row['steps_per_s']:.3g} steps/s", flush=True)
            pending, tick, tick_step = [], now, step
        if ckpt.should_save(step) or step == t.n_iters or received:
            ckpt.save(step, state, metadata=metadata())
        if received:
            bar.close()
            ckpt.close()
            raise Stop(f"stopped by signal {received[0]} at step {step}; checkpoint saved in {ckpt.directory}",
                       128 + received[0])  # fmt: skip
    bar.close()
    ckpt.close()
    return state, row


def steps_per_call(config) -> int:
    """``config.training.steps_per_call`` (1 for a config written before the option existed)."""
    k = config.training.get("steps_per_call", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise common.ConfigError(f"config.training.steps_per_call: must be an integer >= 1, got {k!r}")
    return k


def _chunk(step: int, k: int, t, ckpt: Checkpointer) -> int:
    """How many steps the next call takes: ``k``, unless a log or checkpoint step or the end comes sooner.

    Then it is 1, and single steps carry the run to that step (a resumed run may start off the grid of ``k``).
    """
    if k == 1 or step + k > t.n_iters:
        return 1
    if any(s % t.log_every == 0 or ckpt.should_save(s) for s in range(step + 1, step + k)):
        return 1
    return k


def _per_step(chunks: list[dict]) -> list[dict]:
    """Metrics of calls (each a dict of arrays with one entry per step) as one dict per step."""
    return [{name: m[name][i] for name in m} for m in chunks for i in range(len(m["loss"]))]


def resume(ckpt: Checkpointer, target, data, workdir: str, restart: bool):
    """The state and data position of the newest readable checkpoint, both from that one checkpoint.

    ``target`` gives the structure, shapes and shardings (an abstract state). With no checkpoint to resume
    from, the state returned is ``None`` and the step 0.

    Unreadable newer checkpoints are moved aside to ``checkpoints/corrupt-<step>`` (never deleted) and named. If
    checkpoints exist and none reads, the run is refused, unless ``restart`` asks to start again from step 0 (the
    unreadable ones are moved aside and ``metrics.jsonl`` to ``metrics-before-restart-<time>.jsonl``).
    """
    found = ckpt.restore_newest(target)
    if found.step is None and found.unreadable and not restart:
        names = "; ".join(f"{s} ({why[:80]})" for s, why in found.unreadable)
        raise common.ConfigError(f"--workdir {workdir}: every checkpoint in {ckpt.directory} is unreadable: "
                                 f"{names}. Pass --restart to train again from step 0 (they are moved aside, "
                                 "not deleted)")  # fmt: skip
    for step, why in found.unreadable:
        moved = ckpt.move_aside(step)
        print(f"note: checkpoint {step} is unreadable ({why}); moved to {moved}", flush=True)
    if found.step is None:
        log = os.path.join(workdir, "metrics.jsonl")
        if found.unreadable and os.path.exists(log):
            kept = os.path.join(workdir, f"metrics-before-restart-{time.strftime('%Y%m%dT%H%M%S')}.jsonl")
            os.replace(log, kept)
            print(f"note: --restart: starting from step 0; the old metrics are in {kept}", flush=True)
        return None, 0
    data.restore(found.metadata["data"])  # the data order continues where that same checkpoint stopped
    start = int(found.value.step)
    print(f"resumed from checkpoint {found.step} in {ckpt.directory} (step {start}, data position: epoch "
          f"{data.state.get('epoch')}, batch {data.state.get('index')})", flush=True)  # fmt: skip
    return found.value, start


def main(argv):
    common.parse_flags(argv)
    config = common.validate(FLAGS.config)
    evaluation.check_sampler(config, common.build_sde(config))  # the end-of-run sampler, checked before training
    steps_per_call(config)
    workdir = wd.prepare_dir(FLAGS.workdir)
    with wd.Lock(workdir) as lock:
        if lock.note:
            print(lock.note, flush=True)
        wd.check_resume(workdir, config)  # before anything of the run is written
        wd.write_json_atomic(os.path.join(workdir, "config.json"), None, text=config.to_json_best_effort(indent=1))
        t0 = time.perf_counter()
        try:
            state, row = train(config, workdir, FLAGS.nonfinite, FLAGS.restart)
        except Stop as stop:
            print(stop, file=sys.stderr)
            return stop.code
        train_s = time.perf_counter() - t0
        if config.eval.enabled:
            summary = {"config": config.get("name", config.data.dataset), "step": int(state.step)}
            if row is not None:
                summary["final_loss"] = round(row["loss"], 5)
            if not evaluation.plot_losses(workdir):
                print(f"note: {workdir}/metrics.jsonl has no rows (removed?); no loss.png", flush=True)
            summary.update(evaluation.run(config, workdir, state.ema_params, step=int(state.step)))
            summary["train_s"] = round(train_s, 1)
            evaluation.write_summary(workdir, summary)


if __name__ == "__main__":
    sys.exit(common.run_main(main))
