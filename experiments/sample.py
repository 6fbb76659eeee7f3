"""Draws samples from a trained run with any sampler, and writes them as ``.npz`` and a PNG.

    python experiments/sample.py --workdir runs/digits --n 64 --method dpm_solver++ --steps 20
    python experiments/sample.py --workdir runs/digits --method pc --steps 500 --option snr=0.16
    python experiments/sample.py --workdir runs/digits_cond --label 3 --guidance 2.0

Reads ``WORKDIR/config.json`` and the newest EMA parameters; without ``--method`` the config's sampler is used.
Writes ``OUT.npz`` (``samples`` in the data's range, ``labels``, ``nfe``) and ``OUT.png`` (a grid, or a scatter
plot for 2-D data), with ``OUT`` defaulting to ``WORKDIR/samples_<method>_<steps>``, and reports the NFE and
the wall time (compilation included).
"""

from __future__ import annotations

import ast
import os
import sys

import common
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a directory written by experiments/train.py")
flags.DEFINE_integer("n", 64, "number of samples")
flags.DEFINE_string("method", None, "sampler (default: the config's sampling.method)")
flags.DEFINE_integer("steps", None, "sampler steps (default: the config's, for its sampler)")
flags.DEFINE_multi_string("option", [], "sampler option as name=value, e.g. --option snr=0.16 (repeatable)")
flags.DEFINE_integer("label", None, "class label, for a class-conditional model")
flags.DEFINE_float("guidance", None, "classifier-free guidance weight w (needs --label)")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_string("out", None, "output path without extension")


def _options(items):
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise common.ConfigError(f"--option {item!r}: expected name=value")
        try:
            options[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[name] = value  # a bare string such as predictor=euler_maruyama
    return options


def main(argv):
    common.parse_flags(argv)
    config, params, step = common.load_workdir(FLAGS.workdir)
    sde, model = common.build_sde(config), common.build_model(config)
    num_classes = getattr(model, "num_classes", None)
    if (FLAGS.label is not None or FLAGS.guidance is not None) and num_classes is None:
        raise common.ConfigError("--label/--guidance: the model of this run is not class-conditional")
    if FLAGS.guidance is not None and FLAGS.label is None:
        raise common.ConfigError("--guidance needs --label")
    if num_classes is not None and FLAGS.label is None:
        labels = np.arange(FLAGS.n) % num_classes  # every class in turn
    elif FLAGS.label is not None:
        if not 0 <= FLAGS.label < num_classes:
            raise common.ConfigError(f"--label must be in [0, {num_classes}), got {FLAGS.label}")
        labels = np.full(FLAGS.n, FLAGS.label)
    else:
        labels = None
    y = None if labels is None else jnp.asarray(labels, jnp.int32)
    score_fn = common.build_score_fn(config, sde, model, params, y=y, guidance_weight=FLAGS.guidance)

    method = FLAGS.method or config.sampling.method
    steps = FLAGS.steps or (config.sampling.steps if method == config.sampling.method else None)
    shape = (FLAGS.n, *common.build_dataset(config, "test", batch_size=1).info.shape)
    try:
        x, nfe, secs = common.draw_samples(
            config, score_fn, sde, shape, jax.random.key(FLAGS.seed), method=method, steps=steps,
            **_options(FLAGS.option),
        )  # fmt: skip
    except ValueError as e:  # an unknown sampler or option
        raise common.ConfigError(str(e).splitlines()[0]) from None

    out = FLAGS.out or os.path.join(FLAGS.workdir, f"samples_{method}_{steps or 'default'}")
    np.savez(out + ".npz", samples=x, labels=labels if labels is not None else np.zeros(0), nfe=nfe, step=step)
    title = f"{method}, NFE {nfe}, step {step}" + (f", label {FLAGS.label}" if FLAGS.label is not None else "")
    if FLAGS.guidance is not None:
        title += f", guidance {FLAGS.guidance:g}"
    if x.ndim == 2:
        reference = common.build_dataset(config, "test", batch_size=FLAGS.n).batch(0)["x"]
        common.save_toy_plot(out + ".png", x, reference, title=title, lim=config.eval.plot_range)
    else:
        common.save_image_grid(out + ".png", common.to_unit_range(config, x), title=title)
    print(f"{FLAGS.n} samples, {method}, NFE {nfe}, {secs:.1f} s (compilation included) -> {out}.npz, {out}.png")


if __name__ == "__main__":
    sys.exit(common.run_main(main))
