"""Inpaints or colorizes test images with a trained score network (Song et al. 2021, appendix I).

    python experiments/edit.py --workdir runs/digits --task inpaint --mask center
    python experiments/edit.py --workdir runs/cifar10 --task colorize --method ode --steps 200

Reads the run with the same fallback as ``train.py`` (the newest readable checkpoint of ``WORKDIR/checkpoints``;
unreadable newer ones are named) and writes ``WORKDIR/edit_<task>[_<mask>].png``: per test image the original, the input
(masked, or grayscale) and the result.
"""

from __future__ import annotations

import os
import sys

import common
import jax
import numpy as np
import workdir as wd
from absl import flags

from jaxdiff import guidance

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a training work directory (config.json, checkpoints/)")
flags.DEFINE_enum("task", "inpaint", ["inpaint", "colorize"], "what to do")
flags.DEFINE_enum("mask", "center", ["left_half", "center", "random"], "which pixels are known (inpaint)")
flags.DEFINE_string("method", "pc", "constrained sampler: pc, reverse_diffusion, ancestral, ode, ode_euler")
flags.DEFINE_integer("steps", None, "time steps (default: the SDE's N)")
flags.DEFINE_integer("num_images", 8, "test images to edit")
flags.DEFINE_integer("seed", 0, "PRNG seed")


def save_panel(path: str, columns: dict[str, np.ndarray]) -> None:
    """One row per image, one column per entry of ``columns`` (images in ``[0, 1]``, NHWC)."""
    import matplotlib.pyplot as plt

    n = len(next(iter(columns.values())))
    fig, axes = plt.subplots(n, len(columns), figsize=(1.6 * len(columns), 1.6 * n), squeeze=False)
    for j, (title, images) in enumerate(columns.items()):
        axes[0, j].set_title(title, fontsize=9)
        for i in range(n):
            im = images[i]
            axes[i, j].imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray", vmin=0.0, vmax=1.0)
            axes[i, j].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    common.parse_flags(argv)
    config, params, step = common.load_workdir(FLAGS.workdir)
    if config.data.dataset in common.TOY_DATASETS:
        raise common.ConfigError(f"config.data.dataset={config.data.dataset!r}: editing needs an image data set")
    sde = common.build_sde(config)
    model = common.build_model(config)
    score_fn = common.build_score_fn(config, sde, model, params)
    data = common.build_dataset(config, "test", batch_size=FLAGS.num_images, shuffle=False, random_flip=False)
    x = np.asarray(data.batch(0)["x"], np.float32)
    name = f"edit_inpaint_{FLAGS.mask}.png" if FLAGS.task == "inpaint" else "edit_colorize.png"
    wd.check_output(os.path.join(FLAGS.workdir, name), "--workdir")
    key = jax.random.key(FLAGS.seed)
    options = dict(method=FLAGS.method, steps=FLAGS.steps)

    try:
        if FLAGS.task == "inpaint":
            mask = guidance.make_mask(FLAGS.mask, x.shape, key=jax.random.fold_in(key, 1))
            out, info = guidance.inpaint(jax.random.fold_in(key, 0), score_fn, sde, x, mask, **options)
            low = -1.0 if config.data.centered else 0.0  # unknown pixels shown black
            shown = np.where(np.asarray(mask) > 0, x, low)
        else:
            if x.shape[-1] != 3:
                raise common.ConfigError(f"--task colorize needs RGB images; {config.data.dataset} has {x.shape[-1]}")
            gray = guidance.grayscale(x)
            out, info = guidance.colorize(jax.random.fold_in(key, 0), score_fn, sde, gray, **options)
            shown = np.repeat(np.asarray(gray), 3, axis=-1)
    except ValueError as e:
        raise common.ConfigError(str(e).splitlines()[0]) from None

    wd.require_finite(out, info, f"{FLAGS.task} of {len(x)} images")
    path = os.path.join(FLAGS.workdir, name)
    columns = {"original": x, "input": shown, "result": np.asarray(out)}
    save_panel(path, {k: common.to_unit_range(config, v) for k, v in columns.items()})
    print(f"{FLAGS.task} with checkpoint {step}: nfe={int(info['nfe'])}, wrote {path}")


if __name__ == "__main__":
    sys.exit(common.run_main(main))
