"""Train-step throughput and compile time, on one device and data-parallel over eight.

Prints one JSON line per (config, device count): compile time of the jitted train step, then examples per
second over timed steps after compilation (synthetic batches of the data's shape; the step is the library's
``make_train_step`` with the continuous VP loss and the reference Adam settings).

Configs:
  mlp_2d        MLP (256, 256, 256) on 2-D points, batch 1024.
  ddpmpp_tiny   DDPM++ nf=32, ch_mult (1, 2), 2 blocks, attention at 4x4, on 8x8x1 digits, batch 64.
  ddpmpp_cifar  the paper's CIFAR-10 DDPM++ (cont.): nf=128, ch_mult (1, 2, 2, 2), 4 blocks, attention at
                16x16, dropout 0.1, on 32x32x3; batch 8 (a CPU-sized batch; the paper uses 128).

Every measurement runs in its own subprocess: the eight-device one with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which must be set before JAX starts (on CPU these are
virtual devices sharing the host's cores: the number measures sharding overhead, not a speed-up).

    python benchmarks/train_step.py                 # all configs, 1 and 8 devices
    python benchmarks/train_step.py --quick         # fewer timed steps
    python benchmarks/train_step.py --configs mlp_2d,ddpmpp_tiny --devices 1

Where a step's time goes (per block, the loss's randomness, the optimiser's passes over the parameters, the
library's step against a plain hand-written JAX step, and each beside PyTorch on the same core) is measured by
``benchmarks/train_breakdown.py``; ``--breakdown`` here runs it with its defaults (one core, both DDPM++ sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = ("mlp_2d", "ddpmpp_tiny", "ddpmpp_cifar")
STEPS = {"mlp_2d": (50, 10), "ddpmpp_tiny": (20, 5), "ddpmpp_cifar": (3, 1)}  # timed steps: full, --quick


def _build(name: str):
    from jaxdiff.models import MLP, DDPMpp

    if name == "mlp_2d":
        return MLP(hidden_sizes=(256, 256, 256), embedding_type="positional"), (1024, 2)
    if name == "ddpmpp_tiny":
        model = DDPMpp(nf=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.1)
        return model, (64, 8, 8, 1)
    if name == "ddpmpp_cifar":
        model = DDPMpp(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.1)
        return model, (8, 32, 32, 3)
    raise ValueError(f"unknown config {name!r}; valid: {', '.join(CONFIGS)}")


def worker(name: str, num_devices: int, quick: bool) -> dict:
    """Measures one config in this process (JAX starts here)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.losses import make_loss_fn
    from jaxdiff.parallel import make_mesh, shard_batch
    from jaxdiff.sde import VPSDE
    from jaxdiff.train import create_train_state, make_optimizer, make_train_step

    if jax.device_count() != num_devices:
        raise RuntimeError(f"expected {num_devices} devices, JAX sees {jax.device_count()}")
    model, shape = _build(name)
    mesh = make_mesh() if num_devices > 1 else None
    tx = make_optimizer()  # lr 2e-4, warm-up 5000, grad clip 1, Adam(0.9, 0.999, 1e-8)
    t0 = time.perf_counter()
    state = create_train_state(jax.random.key(0), model, jax.ShapeDtypeStruct(shape, jnp.float32), tx, mesh=mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))

    train_step = make_train_step(make_loss_fn(VPSDE(), model), tx, mesh=mesh)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal(shape, dtype=np.float32)} for _ in range(2)]
    if mesh is not None:
        batches = [shard_batch(mesh, b) for b in batches]
    else:
        batches = [jax.device_put(b) for b in batches]

    t0 = time.perf_counter()
    compiled = train_step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0

    state, metrics = compiled(state, batches[0])  # warm-up (first execution)
    jax.block_until_ready(metrics)
    steps = STEPS[name][1 if quick else 0]
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - t0
    return {
        "benchmark": "train_step",
        "config": name,
        "devices": num_devices,
        "platform": jax.devices()[0].platform,
        "batch_size": shape[0],
        "example_shape": list(shape[1:]),
        "params": n_params,
        "init_s": round(init_s, 3),
        "compile_s": round(compile_s, 3),
        "timed_steps": steps,
        "step_ms": round(1e3 * elapsed / steps, 2),
        "examples_per_s": round(shape[0] * steps / elapsed, 2),
        "loss": float(metrics["loss"]),
        "cpu_count": os.cpu_count(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--devices", default="1,8", help="comma-separated device counts (CPU: virtual devices)")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "DEVICES"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--breakdown", action="store_true", help="run benchmarks/train_breakdown.py instead (per block, vs torch)"
    )
    args = parser.parse_args(argv)

    if args.breakdown:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_breakdown.py")
        return subprocess.run([sys.executable, script]).returncode

    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.quick)), flush=True)
        return 0

    failures = 0
    for name in args.configs.split(","):
        for n in (int(d) for d in args.devices.split(",")):
            env = dict(os.environ)
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
            if n > 1:
                env.setdefault("JAX_PLATFORMS", "cpu")
                flags.append(f"--xla_force_host_platform_device_count={n}")
            env["XLA_FLAGS"] = " ".join(flags)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, str(n)] + (
                ["--quick"] if args.quick else []
            )
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode == 0:
                print(proc.stdout.strip().splitlines()[-1], flush=True)
            else:
                failures += 1
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(json.dumps({"benchmark": "train_step", "config": name, "devices": n, "error": tail}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
