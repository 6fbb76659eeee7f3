"""Imports a checkpoint of the reference score_sde code as a jaxdiff work directory.

    python experiments/import_score_sde.py --checkpoint exp/ve/cifar10_ncsnpp_continuous/checkpoint_24 \\
        --config score_sde/configs/ve/cifar10_ncsnpp_continuous.py --workdir runs/cifar10_ve_ncsnpp_paper
    python experiments/sample.py --workdir runs/cifar10_ve_ncsnpp_paper --method pc --steps 1000
    python experiments/evaluate.py --workdir runs/cifar10_ve_ncsnpp_paper --num_samples 64

``--config`` is the reference run's config: its JSON, or a reference config file (with the score_sde
repository root on ``PYTHONPATH``). Writes ``WORKDIR/config.json`` (the equivalent jaxdiff config) and
``WORKDIR/checkpoints/<step>`` (the optimiser's target as ``params``, ``params_ema`` as ``ema_params``), which
``sample.py``, ``evaluate.py`` and ``edit.py`` read like a run of ``train.py``. Continuous-time models are written
in jaxdiff's own conventions; the others (discrete-time DDPM and SMLD models, Fourier features with a VP SDE)
keep the reference's data range and carry the reference settings in ``config.score_sde``, from which
``common.build_score_fn`` builds the reference's own score function (``get_score_fn(..., continuous=False)`` for
a discrete model). An unsupported config or a checkpoint that does not fit it is one line on stderr and exit
code 2.
"""

from __future__ import annotations

import os
import sys

import common
import jax
import jax.numpy as jnp
import workdir as wd
from absl import flags

from jaxdiff.checkpoint import Checkpointer
from jaxdiff.compat import score_sde

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "a score_sde checkpoint file (checkpoint_<n>) or a directory of them")
flags.DEFINE_string("config", None, "the reference config: its ConfigDict as JSON, or a score_sde config file")
flags.DEFINE_string("workdir", None, "the jaxdiff work directory to write")


def main(argv):
    try:
        FLAGS.unparse_flags()
        FLAGS(list(argv))
    except flags.Error as e:
        raise common.ConfigError(str(e).splitlines()[0]) from None
    for name in ("checkpoint", "config", "workdir"):
        if not FLAGS[name].value:
            raise common.ConfigError(f"--{name} is required")
    checkpoints = os.path.join(FLAGS.workdir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        raise common.ConfigError(f"--workdir {FLAGS.workdir}: already holds checkpoints; choose a new directory")
    try:
        score_sde.workdir_config(FLAGS.config)  # an unsupported config fails before the checkpoint is read
        ckpt = score_sde.load_checkpoint(FLAGS.checkpoint, FLAGS.config)
        config, ema_params = ckpt.workdir(ema=True)
        _, params = ckpt.workdir(ema=False)
    except (score_sde.UnsupportedConfigError, score_sde.CheckpointMismatchError, FileNotFoundError) as e:
        raise common.ConfigError(str(e).splitlines()[0]) from None
    # Only training reads the batch size; keep it valid on this machine's devices.
    n = jax.device_count()
    config.training.batch_size = -(-config.training.batch_size // n) * n
    common.validate(config)

    workdir = wd.prepare_dir(FLAGS.workdir)
    with wd.Lock(workdir):
        wd.write_json_atomic(os.path.join(workdir, "config.json"), None, text=config.to_json_best_effort(indent=1))
        state = {"step": jnp.asarray(ckpt.step, jnp.int32), "params": params, "ema_params": ema_params}
        source = {"format": "score_sde", "checkpoint": os.path.abspath(FLAGS.checkpoint), "step": ckpt.step}
        saver = Checkpointer(checkpoints, keep=None)
        saver.save(ckpt.step, state, metadata={"config": wd.config_dict(config), "source": source})
        saver.close()
    kind = f"{config.model.name}, {config.sde.name}"
    if config.get("score_sde") is not None:
        kind += f", the reference's score function: {score_sde.reference_only(config.score_sde)}"
    print(f"imported step {ckpt.step} ({kind}) -> {FLAGS.workdir}/config.json, {checkpoints}")


if __name__ == "__main__":
    sys.exit(common.run_main(main))
