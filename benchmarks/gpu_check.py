"""The accelerator check: the paper's CIFAR-10 DDPM++ (continuous VP, 61.8M parameters) at batch 128.

One JSON line per measurement, each in a fresh process (so that peak memory is its own):

  train     float32 and bfloat16 compute (``model.dtype``; parameters, optimiser state and EMA float32):
            state creation, compile time, examples/s over timed steps, peak device memory
  sample    DPM-Solver++ (2M) at 20 network evaluations: compile time, samples/s, peak memory

    bash benchmarks/gpu_check.sh                 # everything, well under 8 minutes on one modern GPU
    python benchmarks/gpu_check.py --steps 5     # fewer timed steps
    python benchmarks/gpu_check.py --tiny --batch 4 --steps 2 --repeats 1   # a small network: tries the script

It uses the library alone (no TFDS, no ml_collections): synthetic batches of the data's shape and randomly
initialised parameters, since only the speed is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.1)  # cifar10 DDPM++
TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.1)  # --tiny: a smoke run


def _peak_bytes(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def train(dtype: str, batch: int, steps: int, arch: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.losses import make_loss_fn
    from jaxdiff.models import DDPMpp
    from jaxdiff.sde import VPSDE
    from jaxdiff.train import create_train_state, make_optimizer, make_train_step

    model = DDPMpp(**arch, dtype=dtype)
    tx = make_optimizer()
    t0 = time.perf_counter()
    state = create_train_state(jax.random.key(0), model, jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32), tx)
    jax.block_until_ready(state)
    create_s = time.perf_counter() - t0
    step = make_train_step(make_loss_fn(VPSDE(), model), tx)
    rng = np.random.default_rng(0)
    batches = [{"x": jnp.asarray(rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32))} for _ in range(2)]
    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    for i in range(2):  # warm-up
        state, metrics = compiled(state, batches[i])
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - t0
    return {
        "check": "train",
        "dtype": dtype,
        "batch_size": batch,
        "params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)),
        "create_s": round(create_s, 2),
        "compile_s": round(compile_s, 2),
        "timed_steps": steps,
        "step_ms": round(1e3 * elapsed / steps, 2),
        "examples_per_s": round(batch * steps / elapsed, 1),
        "loss": float(metrics["loss"]),
        "peak_bytes": _peak_bytes(jax.devices()[0]),
    }


def sample(dtype: str, batch: int, repeats: int, arch: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models import DDPMpp
    from jaxdiff.parameterization import make_score_fn
    from jaxdiff.samplers import sample as draw
    from jaxdiff.sde import VPSDE

    sde, model = VPSDE(), DDPMpp(**arch, dtype=dtype)
    x = jnp.zeros((1, 32, 32, 3))
    params = jax.jit(model.init)({"params": jax.random.key(0)}, x, jnp.zeros((1,)))["params"]

    @jax.jit
    def run(params, key):
        score_fn = make_score_fn(model, params, sde, parameterization="eps")
        return draw(key, score_fn, sde, (batch, 32, 32, 3), method="dpm_solver++", steps=20)

    t0 = time.perf_counter()
    compiled = run.lower(params, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - t0
    out, info = compiled(params, jax.random.key(1))
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for r in range(repeats):
        out, info = compiled(params, jax.random.key(2 + r))
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - t0
    return {
        "check": "sample",
        "sampler": "dpm_solver++",
        "dtype": dtype,
        "nfe": int(info["nfe"]),
        "batch_size": batch,
        "compile_s": round(compile_s, 2),
        "samples_per_s": round(batch * repeats / elapsed, 1),
        "finite": bool(np.isfinite(np.asarray(out)).all()),
        "peak_bytes": _peak_bytes(jax.devices()[0]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed train steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed sampling batches")
    parser.add_argument("--tiny", action="store_true", help="a small DDPM++ instead (to try the script anywhere)")
    parser.add_argument("--only", choices=("train", "sample"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    arch = TINY if args.tiny else ARCH
    if args.only == "train":
        print(json.dumps(train(args.dtype, args.batch, args.steps, arch)), flush=True)
        return 0
    if args.only == "sample":
        print(json.dumps(sample(args.dtype, args.batch, args.repeats, arch)), flush=True)
        return 0

    import jax  # only to say what ran

    device = jax.devices()[0]
    print(json.dumps({"check": "device", "platform": device.platform, "kind": device.device_kind,
                      "jax": jax.__version__}), flush=True)  # fmt: skip
    failures = 0
    common = ["--batch", str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    common += ["--tiny"] if args.tiny else []
    for only, dtype in (("train", "float32"), ("train", "bfloat16"), ("sample", "float32"), ("sample", "bfloat16")):
        cmd = [sys.executable, os.path.abspath(__file__), "--only", only, "--dtype", dtype, *common]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode == 0:
            print(proc.stdout.strip().splitlines()[-1], flush=True)
        else:
            failures += 1
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(json.dumps({"check": only, "dtype": dtype, "error": tail[:300]}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
