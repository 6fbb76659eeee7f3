"""Draws samples from a trained run with any sampler, and writes them as ``.npz`` and a PNG.

    python experiments/sample.py --workdir runs/digits --n 64 --method dpm_solver++ --steps 20
    python experiments/sample.py --workdir runs/digits --method pc --steps 500 --option snr=0.16
    python experiments/sample.py --workdir runs/digits --method ode --option rtol=1e-4 --option atol=1e-4
    python experiments/sample.py --workdir runs/digits_cond --label 3 --guidance 2.0

Reads the run with the same fallback as ``train.py`` (the newest readable checkpoint; unreadable newer ones are
named); without ``--method`` the config's sampler is used. Writes ``OUT.npz`` (``samples`` in the data's range,
``labels``, ``nfe``, ``step``) and ``OUT.png`` (a grid of the first 256, or a scatter plot for 2-D data), with
``OUT`` defaulting to ``WORKDIR/samples_<method>_<steps>``. ``--n`` is drawn in batches of ``--batch_size``,
batch ``b`` from ``fold_in(key(seed), b)``; each batch goes to ``OUT.partial.npy`` as soon as it is drawn, so an
interrupted run loses at most one batch and the same command continues where it stopped. The output path and
the free disk space are checked before sampling, and non-finite samples are refused (exit code 3), not saved.
"""

from __future__ import annotations

import ast
import json
import math
import os
import sys

import common
import evaluation
import jax
import jax.numpy as jnp
import numpy as np
import workdir as wd
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a directory written by experiments/train.py")
flags.DEFINE_integer("n", 64, "number of samples")
flags.DEFINE_integer("batch_size", evaluation.BATCH, "samples per sampler call (bounds the memory)")
flags.DEFINE_string("method", None, "sampler (default: the config's sampling.method)")
flags.DEFINE_integer("steps", None, "sampler steps (default: the config's, for its sampler; none for ode)")
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


class PartialFile:
    """Batches written as they come into ``OUT.partial.npy``; ``OUT.partial.json`` says which are done and for what."""

    def __init__(self, out: str, shape, manifest: dict):
        self.path, self.meta = out + ".partial.npy", out + ".partial.json"
        self.manifest, self.done = manifest, 0
        previous = self._read_manifest()
        if previous is not None and previous.get("manifest") == manifest and os.path.exists(self.path):
            self.array = np.lib.format.open_memmap(self.path, mode="r+")
            self.done = int(previous["done"])
        else:
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=tuple(shape))

    def _read_manifest(self):
        try:
            with open(self.meta) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def write(self, b: int, x, batch_size: int) -> None:
        self.array[b * batch_size : b * batch_size + len(x)] = x
        self.array.flush()
        self.done = b + 1
        wd.write_json_atomic(self.meta, {"manifest": self.manifest, "done": self.done})

    def remove(self) -> None:
        del self.array
        for p in (self.path, self.meta):
            if os.path.exists(p):
                os.remove(p)


def main(argv):
    common.parse_flags(argv)
    if FLAGS.n < 1:
        raise common.ConfigError(f"--n must be >= 1, got {FLAGS.n}")
    if FLAGS.batch_size < 1:
        raise common.ConfigError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    if FLAGS.steps is not None and FLAGS.steps < 1:
        raise common.ConfigError(f"--steps must be >= 1, got {FLAGS.steps}")
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

    def score_for(i0, i1):
        y = None if labels is None else jnp.asarray(labels[i0:i1], jnp.int32)
        return common.build_score_fn(config, sde, model, params, y=y, guidance_weight=FLAGS.guidance)

    options = _options(FLAGS.option)
    s = config.sampling
    method, steps = evaluation.sampler_steps(config, FLAGS.method, FLAGS.steps,
                                             {**(dict(s.options) if (FLAGS.method or s.method) == s.method else {}),
                                              **options})  # fmt: skip
    shape = (FLAGS.n, *common.build_dataset(config, "test", batch_size=1).info.shape)

    # Everything that could fail after the long work is checked before it: the output path and the disk space.
    out = FLAGS.out or os.path.join(FLAGS.workdir, f"samples_{method}_{steps or 'adaptive'}")
    wd.check_output(out, "--out" if FLAGS.out else "--workdir")
    need = 2 * 4 * math.prod(shape) + 5_000_000  # the partial file, then the .npz
    wd.check_free_space(os.path.dirname(os.path.abspath(out)), need, f"--n {FLAGS.n} samples")
    manifest = dict(step=step, method=method, steps=steps, options=options, seed=FLAGS.seed, n=FLAGS.n,
                    batch_size=FLAGS.batch_size, label=FLAGS.label, guidance=FLAGS.guidance)  # fmt: skip
    partial = PartialFile(out, shape, json.loads(json.dumps(manifest)))
    if partial.done:
        print(f"continuing {partial.path}: {partial.done} of {math.ceil(FLAGS.n / FLAGS.batch_size)} batches done")
    _, info = evaluation.draw_samples(
        config, score_for, sde, shape, jax.random.key(FLAGS.seed), method=method, steps=steps,
        batch_size=FLAGS.batch_size, start_batch=partial.done, collect=False,
        on_batch=lambda b, x, bad: _write_batch(partial, b, x, bad), **options,
    )  # fmt: skip
    x = partial.array
    np.savez(out + ".npz", samples=x, labels=labels if labels is not None else np.zeros(0), nfe=info["nfe"],
             step=step, batch_size=FLAGS.batch_size)  # fmt: skip
    shown = np.asarray(x[:256])
    partial.remove()
    title = f"{method}, NFE {info['nfe']}, step {step}" + (f", label {FLAGS.label}" if FLAGS.label is not None else "")
    if FLAGS.guidance is not None:
        title += f", guidance {FLAGS.guidance:g}"
    if len(shape) == 2:
        reference = common.build_dataset(config, "test", batch_size=min(FLAGS.n, 2000)).batch(0)["x"]
        common.save_toy_plot(out + ".png", np.asarray(x[:2000]) if len(x) > 2000 else shown, reference, title=title,
                             lim=config.eval.plot_range)  # fmt: skip
    else:
        common.save_image_grid(out + ".png", common.to_unit_range(config, shown), title=title)
    print(f"{FLAGS.n} samples, {method}, NFE {info['nfe']}, {info['seconds']:.1f} s (compilation included) -> "
          f"{out}.npz, {out}.png")  # fmt: skip


def _write_batch(partial: PartialFile, b: int, x, bad: int) -> None:
    if bad:  # refused before anything non-finite is written; the batches before it stay in the partial file
        raise wd.Refused(f"batch {b}: {bad} of {len(x)} samples are not finite (a diverged model or a failed solve); "
                         "nothing saved for it")  # fmt: skip
    partial.write(b, x, FLAGS.batch_size)


if __name__ == "__main__":
    sys.exit(common.run_main(main))
