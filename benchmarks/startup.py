"""Start-up of a training run: state creation, compilation of the train step and the first step.

Every row is a fresh process (what a new or resumed run pays), printed as one JSON line:

  before     the state initialised by one jitted program at XLA's default optimisation level, no cache
  fresh      ``create_train_state`` as the library does it now (the initialiser compiled at the CPU's lowest
             backend optimisation level), no cache
  repeated   the same run again with JAX's persistent compilation cache filled by ``fresh`` (the experiment
             scripts turn it on by default: ``--compilation_cache``)
  resumed    a run restoring the checkpoint ``fresh`` saved: ``abstract_train_state`` (no initialisation at
             all), the restore, and the step from the cache

    python benchmarks/startup.py                        # small DDPM++ (nf 32, 1.75M parameters), batch 32
    python benchmarks/startup.py --config ddpmpp_cifar  # the paper's CIFAR-10 DDPM++ (61.8M), batch 8

``total_s`` is create + compile + first step; the last line gives each row's total as a fraction of ``before``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "ddpmpp_small": (dict(nf=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1), 32),
    "ddpmpp_cifar": (dict(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.1), 8),
}
MODES = ("before", "fresh", "repeated", "resumed")


def worker(config: str, mode: str, scratch: str) -> dict:
    """One measurement in this process (JAX starts here)."""
    t_import = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff import train
    from jaxdiff.checkpoint import Checkpointer
    from jaxdiff.losses import make_loss_fn
    from jaxdiff.models import DDPMpp
    from jaxdiff.sde import VPSDE

    if mode != "before":
        jax.config.update("jax_compilation_cache_dir", os.path.join(scratch, "cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    import_s = time.perf_counter() - t_import
    kwargs, batch = CONFIGS[config]
    model = DDPMpp(**kwargs)
    sample = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
    tx = train.make_optimizer()
    key = jax.random.key(0)
    ckpt = Checkpointer(os.path.join(scratch, "ckpt"), async_save=False)

    t0 = time.perf_counter()
    if mode == "before":
        state = jax.jit(train._init_fn(model, sample, tx))(key)
    elif mode == "resumed":
        state = ckpt.restore_newest(train.abstract_train_state(key, model, sample, tx)).value
    else:
        state = train.create_train_state(key, model, sample, tx)
    jax.block_until_ready(state)
    create_s = time.perf_counter() - t0

    step = train.make_train_step(make_loss_fn(VPSDE(), model), tx)
    x = {"x": jnp.asarray(np.random.default_rng(0).standard_normal(sample.shape, dtype=np.float32))}
    t0 = time.perf_counter()
    lowered = step.lower(state, x)  # tracing the network in Python, and the key of the cache
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = compiled(state, x)
    jax.block_until_ready((state, metrics))
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = compiled(state, x)
    jax.block_until_ready((state, metrics))
    second_s = time.perf_counter() - t0
    if mode == "fresh":
        ckpt.save(int(state.step), state)
    ckpt.close()
    return {
        "benchmark": "startup",
        "config": config,
        "mode": mode,
        "batch_size": batch,
        "params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)),
        "import_s": round(import_s, 2),
        "create_s": round(create_s, 2),
        "compile_s": round(compile_s, 2),
        "of_which_lower_s": round(lower_s, 2),
        "first_step_s": round(first_s, 2),
        "second_step_s": round(second_s, 2),
        "total_s": round(create_s + compile_s + first_s, 2),
        "platform": jax.devices()[0].platform,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ddpmpp_small", choices=sorted(CONFIGS))
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "SCRATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.config, *args.worker)), flush=True)
        return 0

    scratch = tempfile.mkdtemp(prefix="jaxdiff-startup-")
    rows = {}
    try:
        for mode in MODES:
            cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--worker", mode, scratch]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(json.dumps({"benchmark": "startup", "mode": mode, "error": tail}), flush=True)
                return 1
            line = proc.stdout.strip().splitlines()[-1]
            rows[mode] = json.loads(line)
            print(line, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = rows["before"]["total_s"]
    summary = {m: round(r["total_s"] / base, 3) for m, r in rows.items()}
    print(json.dumps({"benchmark": "startup", "config": args.config, "total_vs_before": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
