"""One process of a multi-process training run; its launch is the recipe for a multi-host run.

``tests/test_multiprocess.py`` starts two copies of this script on one machine, each with two virtual
CPU devices, and checks that five data-parallel train steps over the four devices give the losses and
parameters of one process driving four devices, and that the checkpoint written by both processes
restores in a single process. The same script, unchanged, is the shape of a multi-host GPU or TPU run.

What every process runs (here: one per CPU "host"; on real hardware: one per host)::

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
    python tests/mp_train_worker.py --coordinator 127.0.0.1:12345 --num-processes 2 \\
        --process-id {0,1} --workdir /tmp/mp_run --steps 5

The arguments and what they become:

* ``--coordinator host:port`` is the address of process 0, reachable from every process;
  ``--num-processes`` and ``--process-id`` say how many processes there are and which one this is.
  They go to :func:`jaxdiff.parallel.initialize_distributed`, which must run before any other JAX
  call; on CPU it switches cross-process collectives to gloo first.
* Every process builds the same mesh over *all* devices of *all* processes
  (:func:`jaxdiff.parallel.make_mesh`), the same train state (same seed: it is replicated, never
  broadcast) and the same jitted train step.
* Every process reads only its own contiguous slice of each global batch
  (``data.get_dataset(..., process_index=jax.process_index(), process_count=jax.process_count())``,
  the default) and :func:`jaxdiff.parallel.shard_batch` stitches the slices into the global batch
  array; XLA inserts the gradient all-reduce across processes.
* Every process calls ``Checkpointer.save`` with the same directory, which must be shared storage
  (a network file system or a bucket) on real hardware: orbax coordinates the processes, each
  writes the shards it owns (one copy of a replicated array) and process 0 the metadata.
* Values are fetched to the host with ``jax.experimental.multihost_utils.process_allgather``, a
  collective that every process must call. A real run logs from process 0 only; here every process
  writes its copy (``result_<process>.npz``) so that the test can check they agree.

What changes on real hardware:

* On a TPU pod slice, or under SLURM / Open MPI on GPUs, leave out ``--coordinator``,
  ``--num-processes`` and ``--process-id``: the script then calls ``initialize_distributed()`` with no
  arguments and JAX finds the coordinator, the process count and the process id itself. Elsewhere
  pass them, e.g. ``--coordinator $MASTER_ADDR:$MASTER_PORT --num-processes $WORLD_SIZE --process-id $RANK``.
* Run one process per host (it drives all local GPUs or TPU chips); do not set ``XLA_FLAGS`` or
  ``JAX_PLATFORMS``. On GPUs with several processes per host, also pass ``local_device_ids``.
* The global batch size must be a multiple of the total device count; each host feeds
  ``batch_size / process_count`` examples per step.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from jaxdiff import data, losses, models, parallel, train
from jaxdiff.checkpoint import Checkpointer
from jaxdiff.sde import VPSDE

GLOBAL_BATCH = 32  # divides by the 4 devices of the test (2 processes x 2 devices)
SEED = 0


def build(mesh):
    """The model, optimiser and jitted data-parallel train step shared by every process."""
    model = models.MLP(hidden_sizes=(32, 32), embedding_size=16, embedding_type="positional")
    tx = train.make_optimizer(learning_rate=1e-2, warmup=0, grad_clip=1.0)
    loss_fn = losses.make_loss_fn(VPSDE(), model)
    train_step = train.make_train_step(loss_fn, tx, ema_rate=0.9, mesh=mesh)
    return model, tx, train_step


def run(mesh, steps: int, *, process_index: int, process_count: int):
    """Trains for ``steps`` steps; returns the final (replicated) state and the per-step losses.

    With one process this is the single-process reference of the same global batches.
    """
    model, tx, train_step = build(mesh)
    ds = data.get_dataset(
        "gaussian_grid",
        batch_size=GLOBAL_BATCH,
        seed=SEED,
        process_index=process_index,
        process_count=process_count,
    )
    state = train.create_train_state(jax.random.key(SEED), model, jnp.zeros((GLOBAL_BATCH, 2)), tx, mesh=mesh)
    step_losses = []
    for _ in range(steps):
        batch = parallel.shard_batch(mesh, {"x": next(ds)["x"]})
        state, metrics = train_step(state, batch)
        step_losses.append(metrics["loss"])
    return state, step_losses, ds


def to_host(tree):
    """Fetches replicated global arrays to numpy on every process (a collective: all must call it)."""
    return multihost_utils.process_allgather(tree, tiled=True)


def flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--init-timeout", type=int, default=60, help="seconds to wait for every process")
    args = parser.parse_args(argv)

    if args.num_processes is None:
        parallel.initialize_distributed()  # cluster auto-detection (TPU pods, SLURM, Open MPI); else one process
    elif args.num_processes > 1:
        parallel.initialize_distributed(
            args.coordinator,
            args.num_processes,
            args.process_id,
            initialization_timeout=args.init_timeout,
            heartbeat_timeout_seconds=args.init_timeout,
            shutdown_timeout_seconds=args.init_timeout,
        )
    distributed = jax.process_count() > 1
    mesh = parallel.make_mesh()
    state, step_losses, ds = run(mesh, args.steps, process_index=jax.process_index(), process_count=jax.process_count())

    ckpt = Checkpointer(os.path.join(args.workdir, "checkpoints"), keep=1)
    ckpt.save(args.steps, state, metadata={"data": ds.state})  # every process calls save
    ckpt.close()

    host = to_host({"losses": jnp.stack(step_losses), "params": state.params, "ema_params": state.ema_params})
    np.savez(
        os.path.join(args.workdir, f"result_{jax.process_index()}.npz"),
        losses=host["losses"],
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
        local_batch=ds.local_batch_size,
        **{"params/" + k: v for k, v in flat(host["params"]).items()},
        **{"ema_params/" + k: v for k, v in flat(host["ema_params"]).items()},
    )
    if distributed:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
