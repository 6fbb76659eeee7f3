"""Several optimiser steps per compiled call: steps/s for K = 1, 4, 16 on the CPU-sized configs.

For each model, the library's train step with ``steps_per_call=K`` runs the same number of optimiser steps; K is
interleaved over repeats (one JSON line per model: the median steps/s of each K and its ratio to K = 1). The
batches are on the device already, so what is measured is the step and its dispatch, not the data pipeline.

  toy_mlp      the ``toy_vp_mlp`` network: MLP (128, 128, 128), batch 256 of 2-D points
  digits_unet  the ``digits_vp_ddpmpp`` network: DDPM++ nf 32, ch_mult (1, 2), batch 64 of 8x8 digits

    python benchmarks/steps_per_call.py
    taskset -c 1 python benchmarks/steps_per_call.py --models toy_mlp --steps 256 --repeats 5
    taskset -c 1 python benchmarks/steps_per_call.py --models digits_unet --steps 32 --repeats 3 --ks 1,4

On the CPU the K steps are unrolled (see ``make_train_step``): compiling K = 16 steps of the U-Net takes minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

KS = (1, 4, 16)


def _model(name: str):
    from jaxdiff.models import MLP, DDPMpp

    if name == "toy_mlp":
        return MLP(hidden_sizes=(128, 128, 128), embedding_size=32, embedding_type="positional"), (256, 2)
    net = DDPMpp(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), embedding_type="positional",
                 init_scale=0.0)  # fmt: skip
    return net, (64, 8, 8, 1)


def measure(name: str, steps: int, repeats: int, ks: tuple[int, ...] = KS) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.losses import make_loss_fn
    from jaxdiff.sde import VPSDE
    from jaxdiff.train import create_train_state, make_optimizer, make_train_step

    model, shape = _model(name)
    tx = make_optimizer(learning_rate=1e-3, warmup=100)
    loss_fn = make_loss_fn(VPSDE(), model)
    state = create_train_state(jax.random.key(0), model, jax.ShapeDtypeStruct(shape, jnp.float32), tx)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, *shape), dtype=np.float32))
    runs = {}
    for k in ks:
        fn = make_train_step(loss_fn, tx, steps_per_call=k, donate=False)
        batch = {"x": x[0]} if k == 1 else {"x": x[:k]}
        jax.block_until_ready(fn(state, batch))  # compile and warm up
        runs[k] = (fn, batch)
    rates = {k: [] for k in ks}
    for _ in range(repeats):
        for k, (fn, batch) in runs.items():
            s = state
            t0 = time.perf_counter()
            for _ in range(steps // k):
                s, metrics = fn(s, batch)
            jax.block_until_ready((s, metrics))
            rates[k].append((steps // k) * k / (time.perf_counter() - t0))
    med = {k: statistics.median(r) for k, r in rates.items()}
    return {
        "benchmark": "steps_per_call",
        "model": name,
        "batch_size": shape[0],
        "steps": steps,
        "repeats": repeats,
        "steps_per_s": {str(k): round(v, 1) for k, v in med.items()},
        "ratio_to_k1": {str(k): round(v / med[1], 3) for k, v in med.items()},
        "platform": jax.devices()[0].platform,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="toy_mlp,digits_unet")
    parser.add_argument("--steps", type=int, default=64, help="optimiser steps per timed run (a multiple of 16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="steps per call to compare (1 first)")
    args = parser.parse_args(argv)
    ks = tuple(int(k) for k in args.ks.split(","))
    for name in args.models.split(","):
        print(json.dumps(measure(name, args.steps, args.repeats, ks)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
