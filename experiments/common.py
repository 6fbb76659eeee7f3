"""What every experiment script shares: config in, library objects out.

A config (``experiments/configs/*.py``) has the sections ``data``, ``sde``, ``model``, ``training``, ``optim``,
``sampling`` and ``eval``. The builders here turn it into the library's objects::

    sde = build_sde(config)                          # VPSDE / SubVPSDE / VESDE
    model = build_model(config)                      # get_model(config.model.name, **architecture)
    data = build_dataset(config, "train")            # resumable BatchIterator
    loss_fn = build_loss_fn(config, sde, model)      # loss_fn(params, key, batch)
    score_fn = build_score_fn(config, sde, model, params)

and :func:`load_workdir` reads back what ``train.py`` wrote. Every problem with a config or a work directory is
a :class:`ConfigError` whose one-line message names the key; :func:`run_main` turns it (and a bad flag) into
that line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import flags
from ml_collections import ConfigDict

import jaxdiff
from jaxdiff.data import IMAGE_DATASETS, TOY_DATASETS, DatasetNotPreparedError, get_dataset
from jaxdiff.losses import make_loss_fn
from jaxdiff.models import MODELS, get_model
from jaxdiff.parameterization import make_score_fn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SDES = {"vpsde": jaxdiff.VPSDE, "subvpsde": jaxdiff.SubVPSDE, "vesde": jaxdiff.VESDE}
# config.model keys that are not attributes of the network.
NOT_ARCHITECTURE = ("name", "parameterization", "scale_by_sigma", "ema_rate")
SECTIONS = ("data", "sde", "model", "training", "optim", "sampling", "eval")


class ConfigError(ValueError):
    """A wrong config value or an unusable work directory; the message is one line naming the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def validate(config: ConfigDict) -> ConfigDict:
    """Checks the values the library would otherwise reject deep inside a run; returns ``config``."""
    for section in SECTIONS:
        _check(section in config, section, "missing section")
    d, t, o = config.data, config.training, config.optim
    valid = (*IMAGE_DATASETS, *TOY_DATASETS)
    _check(d.dataset in valid, "data.dataset", f"unknown data set {d.dataset!r}; valid: {', '.join(valid)}")
    _check(config.sde.name in SDES, "sde.name", f"unknown SDE {config.sde.name!r}; valid: {', '.join(SDES)}")
    _check(
        config.model.name in MODELS, "model.name", f"unknown model {config.model.name!r}; valid: {', '.join(MODELS)}"
    )
    _check(0.0 <= config.model.ema_rate <= 1.0, "model.ema_rate", f"must be in [0, 1], got {config.model.ema_rate}")
    _check(t.batch_size > 0 and t.batch_size % jax.device_count() == 0, "training.batch_size",
           f"must be a positive multiple of the {jax.device_count()} device(s), got {t.batch_size}")  # fmt: skip
    _check(t.n_iters >= 0, "training.n_iters", f"must be >= 0, got {t.n_iters}")
    for key in ("log_every", "save_every"):
        _check(t[key] >= 1, f"training.{key}", f"must be >= 1, got {t[key]}")
    _check(t.keep >= 1, "training.keep", f"must be >= 1, got {t.keep}")
    _check(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _check(o.warmup >= 0, "optim.warmup", f"must be >= 0, got {o.warmup}")
    s = config.sampling
    methods = jaxdiff.samplers.available_methods()
    _check(s.method in methods, "sampling.method", f"unknown sampler {s.method!r}; valid: {', '.join(methods)}")
    allowed = jaxdiff.samplers.sampler_options(s.method)
    for name in s.options:
        _check(
            name in allowed, f"sampling.options.{name}", f"not an option of {s.method!r}; valid: {', '.join(allowed)}"
        )
    return config


def build_sde(config: ConfigDict) -> jaxdiff.SDE:
    """The forward SDE of ``config.sde`` (``N`` is the number of discrete levels)."""
    s = config.sde
    if s.name == "vesde":
        return jaxdiff.VESDE(sigma_min=s.sigma_min, sigma_max=s.sigma_max, N=s.num_scales)
    return SDES[s.name](beta_min=s.beta_min, beta_max=s.beta_max, N=s.num_scales)


def build_model(config: ConfigDict):
    """The score network: ``get_model(config.model.name, **the other architecture keys)``."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.items() if k not in NOT_ARCHITECTURE}
    try:
        return get_model(config.model.name, **kwargs)
    except TypeError as e:  # an attribute the network does not have
        raise ConfigError(f"config.model: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        raise ConfigError(f"config.model: {str(e).splitlines()[0]}") from None


def build_dataset(config: ConfigDict, split: str, *, batch_size: int | None = None, **overrides):
    """The resumable batch iterator of ``config.data`` (``overrides`` replace ``get_dataset`` arguments)."""
    d = config.data
    kwargs = dict(centered=d.centered, random_flip=d.random_flip and split == "train", dequantize=d.dequantize)
    if d.image_size is not None:
        kwargs["image_size"] = d.image_size
    kwargs.update(overrides)
    try:
        return get_dataset(d.dataset, split=split, batch_size=batch_size or config.training.batch_size,
                           seed=config.seed, **kwargs)  # fmt: skip
    except DatasetNotPreparedError as e:
        raise ConfigError(f"config.data.dataset={d.dataset!r}: {str(e).splitlines()[0]}") from None


def _parameterization(config: ConfigDict) -> dict:
    m = config.model
    return dict(parameterization=m.parameterization, scale_by_sigma=m.scale_by_sigma)


def build_loss_fn(config: ConfigDict, sde, model, *, train: bool = True):
    """``loss_fn(params, key, batch)`` of ``config.training`` (continuous DSM, or DDPM / SMLD)."""
    t = config.training
    try:
        return make_loss_fn(sde, model, continuous=t.continuous, likelihood_weighting=t.likelihood_weighting,
                            importance_sampling=t.importance_sampling, reduce_mean=t.reduce_mean,
                            label_dropout=t.label_dropout, train=train, **_parameterization(config))  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"config.training: {str(e).splitlines()[0]}") from None


def build_score_fn(config: ConfigDict, sde, model, params, *, y=None, guidance_weight=None):
    """``score_fn(x, t)`` of a trained network (with labels and classifier-free guidance if given)."""
    return make_score_fn(model, params, sde, y=y, guidance_weight=guidance_weight, **_parameterization(config))


def build_optimizer(config: ConfigDict):
    """Adam(W) with warm-up and clipping from ``config.optim``."""
    o = config.optim
    return jaxdiff.train.make_optimizer(optimizer=o.optimizer, learning_rate=o.lr, warmup=o.warmup,
                                        grad_clip=o.grad_clip, beta1=o.beta1, eps=o.eps,
                                        weight_decay=o.weight_decay)  # fmt: skip


def load_workdir(workdir: str):
    """Reads ``WORKDIR/config.json`` and the newest EMA parameters in ``WORKDIR/checkpoints``.

    Returns:
      ``(config, params, step)``.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--workdir {workdir}: no config.json (write one with experiments/train.py)")
    with open(path) as f:
        config = validate(ConfigDict(json.load(f)))
    ckpt = jaxdiff.checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"--workdir {workdir}: no checkpoint in {ckpt.directory}")
    return config, ckpt.restore_ema(step), step


def parse_flags(argv, flag_values=flags.FLAGS) -> None:
    """Parses ``argv`` (program name first); a bad flag or config override becomes a :class:`ConfigError`."""
    try:
        flag_values.unparse_flags()
        flag_values(list(argv))
    except flags.Error as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    except AttributeError as e:  # ml_collections: an override of a key the config does not have
        name = str(e).strip("\"'")
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a.split("=")[0].split(".")]
        raise ConfigError(f"unknown config key {bad[0][2:] if bad else name!r}") from None
    if "config" in flag_values:
        try:
            config = flag_values.config
            if config is None:
                raise ConfigError("--config is required (a file in experiments/configs/)")
            config.keys()
        except (AttributeError, OSError, ImportError, SyntaxError) as e:
            path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "the config file")
            raise ConfigError(f"--config: cannot load {path} ({type(e).__name__})") from None
    if "workdir" in flag_values and not flag_values.workdir:
        raise ConfigError("--workdir is required")


def run_main(main, argv=None) -> int:
    """Runs ``main(argv)``; a :class:`ConfigError` is printed as one line and gives exit code 2."""
    try:
        return main(sys.argv if argv is None else argv) or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------------------
# Outputs: image grids, plots, the end-of-run evaluation and its summary
# ----------------------------------------------------------------------------------------------------------
def to_unit_range(config: ConfigDict, x):
    """Model-space images to ``[0, 1]`` (the inverse of the data scaling)."""
    x = np.asarray(x, np.float32)
    return np.clip((x + 1.0) / 2.0 if config.data.centered else x, 0.0, 1.0)


def save_image_grid(path: str, images, *, title: str | None = None) -> None:
    """Writes ``(n, H, W, C)`` images in ``[0, 1]`` as one PNG grid, ``ceil(sqrt(n))`` per row."""
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.float32)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = im
    fig = plt.figure(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + (0.3 if title else 0)))
    plt.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
               interpolation="nearest")  # fmt: skip
    plt.axis("off")
    if title:
        plt.title(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_toy_plot(path: str, samples, data, *, density=None, title: str | None = None, lim=(-3.0, 3.0)) -> None:
    """Scatter of samples over data, and the model density on a grid if given ``(xs, ys, p)``."""
    panels = 2 if density is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 5), squeeze=False)
    ax = axes[0, 0]
    ax.scatter(data[:, 0], data[:, 1], s=1, alpha=0.3, c="gray", label="data")
    ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5, label="samples")
    ax.legend(loc="upper right", markerscale=8)
    ax.set_title(title or "samples", fontsize=9)
    if density is not None:
        xs, ys, p = density
        axes[0, 1].pcolormesh(xs, ys, p, shading="auto", cmap="magma")
        axes[0, 1].set_title("model density (probability-flow ODE)", fontsize=9)
    for a in axes.ravel():
        a.set(xlim=lim, ylim=lim, aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_losses(workdir: str) -> None:
    """``loss.png`` from ``metrics.jsonl``."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="loss (mean over the log interval)", yscale="log")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "loss.png"), dpi=90)
    plt.close(fig)


def draw_samples(config: ConfigDict, score_fn, sde, shape, key, *, method=None, steps=None, **options):
    """Samples with ``config.sampling`` (or the given method); returns ``(x, nfe, seconds)``."""
    s = config.sampling
    method = method or s.method
    opts = dict(s.options) if method == s.method else {}
    opts.update(options)
    t0 = time.perf_counter()
    x, info = jaxdiff.sample(key, score_fn, sde, shape, method=method, steps=steps or s.steps, **opts)
    x = np.asarray(jax.block_until_ready(x))
    return x, int(info["nfe"]), time.perf_counter() - t0


def evaluate(config: ConfigDict, workdir: str, params, *, step: int) -> dict:
    """The end-of-run evaluation of ``config.eval``; returns the summary."""
    e = config.eval
    sde, model = build_sde(config), build_model(config)
    num_classes = getattr(model, "num_classes", None)

    def score_for(labels):  # a class-conditional model is evaluated with labels (unguided)
        y = None if num_classes is None else jnp.asarray(labels, jnp.int32)
        return build_score_fn(config, sde, model, params, y=y)

    test = build_dataset(
        config, "test", batch_size=max(e.num_samples, e.likelihood_examples), shuffle=True, drop_remainder=False
    )
    info, key = test.info, jax.random.key(config.seed + 1)
    summary = {"config": config.get("name", config.data.dataset), "step": step}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        summary["final_loss"] = round([json.loads(line) for line in f if line.strip()][-1]["loss"], 5)
    plot_losses(workdir)

    shape = (e.num_samples, *info.shape)
    labels = np.arange(e.num_samples) % (num_classes or 1)  # every class in turn
    x, nfe, secs = draw_samples(config, score_for(labels), sde, shape, jax.random.fold_in(key, 0))
    summary.update(sampler=config.sampling.method, sampler_nfe=nfe, sampling_s=round(secs, 1))
    title = f"{config.sampling.method}, NFE {nfe}, step {step}"
    toy = config.data.dataset in TOY_DATASETS
    if not toy:
        save_image_grid(os.path.join(workdir, "samples.png"), to_unit_range(config, x[: e.grid_size]), title=title)

    # Likelihood through the probability-flow ODE (eqs. 39-40), on held-out data.
    t0, lk = time.perf_counter(), jax.random.fold_in(key, 1)
    if toy:
        batch = {k: v[: e.likelihood_examples] for k, v in test.batch(0).items()}
        data, score_fn = batch["x"], score_for(batch.get("label"))
        logp, linfo = jaxdiff.likelihood.log_likelihood(lk, score_fn, sde, data, trace="exact")
        summary["test_nll_nats"] = round(float(-jnp.mean(logp)), 4)
        density = None
        if e.density_grid and num_classes is None:
            xs = np.linspace(*e.plot_range, e.density_grid, dtype=np.float32)
            grid = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
            logp_grid, _ = jaxdiff.likelihood.log_likelihood(lk, score_fn, sde, grid, trace="exact", rtol=1e-3,
                                                             atol=1e-3)  # fmt: skip
            density = (xs, xs, np.exp(np.asarray(logp_grid)).reshape(len(xs), len(xs)))
        save_toy_plot(os.path.join(workdir, "samples.png"), x, data, density=density, title=title, lim=e.plot_range)
    else:
        # Uniformly dequantised test images in [0, 1]; bits_per_dim's offset is for 256 levels, so
        # log2(L / 256) converts it to the data's own L levels (17 for digits).
        batch = build_dataset(
            config, "test", batch_size=e.likelihood_examples, centered=False, dequantize=True, drop_remainder=False
        ).batch(0)
        data, score_fn = batch["x"], score_for(batch.get("label"))
        bpd, linfo = jaxdiff.likelihood.bits_per_dim(lk, score_fn, sde, data, centered=config.data.centered,
                                                     num_probes=e.hutchinson_probes, rtol=e.ode_tol,
                                                     atol=e.ode_tol)  # fmt: skip
        summary["test_bits_per_dim"] = round(float(jnp.mean(bpd)) + float(np.log2(info.num_levels / 256)), 4)
        summary["hutchinson_probes"] = e.hutchinson_probes
    summary.update(likelihood_examples=len(data), likelihood_nfe=int(linfo["nfe"]),
                   likelihood_s=round(time.perf_counter() - t0, 1))  # fmt: skip

    if e.quality and not toy:
        summary.update(sample_quality(config, x, test.batch(0)["x"]))
    return summary


def sample_quality(config: ConfigDict, samples, reference) -> dict:
    """FID / KID / classifier score from :mod:`jaxdiff.metrics` (digits classifier), when available."""
    try:
        from jaxdiff import metrics
    except ImportError:
        print("sample quality: skipped (jaxdiff.metrics is not available in this installation)")
        return {}
    if config.data.dataset != "digits":
        print(f"sample quality: skipped (the metrics' classifier is for digits, not {config.data.dataset})")
        return {}
    scores = metrics.evaluate_samples(  # images in [-1, 1]
        2 * to_unit_range(config, samples) - 1, 2 * to_unit_range(config, reference) - 1, metrics.digits_classifier()
    )
    return {k: round(float(v), 4) for k, v in dict(scores).items() if np.ndim(v) == 0}


def write_summary(workdir: str, summary: dict) -> None:
    """Prints the summary as a table and writes ``summary.json``."""
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    width = max(map(len, summary))
    print("\n".join(["", f"{'summary':<{width}}  {workdir}", "-" * (width + 30)]))
    for k, v in summary.items():
        print(f"{k:<{width}}  {v}")
