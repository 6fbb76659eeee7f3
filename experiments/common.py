"""What every experiment script shares: config in, library objects out.

A config (``experiments/configs/*.py``) has the sections ``data``, ``sde``, ``model``, ``training``, ``optim``,
``sampling`` and ``eval``. The builders here turn it into the library's objects::

    sde = build_sde(config)                          # VPSDE / SubVPSDE / VESDE / RectifiedFlow
    model = build_model(config)                      # get_model(config.model.name, **architecture)
    data = build_dataset(config, "train")            # resumable BatchIterator
    loss_fn = build_loss_fn(config, sde, model)      # loss_fn(params, key, batch)
    score_fn = build_score_fn(config, sde, model, params)

and :func:`load_workdir` reads back what ``train.py`` wrote. Every problem with a config or a work directory is
a :class:`ConfigError` whose one-line message names the key; :func:`run_main` turns it (and a bad flag) into
that line on stderr and exit code 2, and any other failure into one line and a non-zero code. The work
directory's integrity (lock, config check, checkpoint fallback) is in ``workdir.py``; the evaluation protocol
shared by ``train.py`` and ``evaluate.py`` in ``evaluation.py``.
"""

from __future__ import annotations

import errno
import os
import sys

import jax
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

SDES = {
    "vpsde": jaxdiff.VPSDE,
    "subvpsde": jaxdiff.SubVPSDE,
    "vesde": jaxdiff.VESDE,
    "rectified_flow": jaxdiff.RectifiedFlow,
}
# config.model keys that are not attributes of the network.
NOT_ARCHITECTURE = ("name", "parameterization", "scale_by_sigma", "ema_rate")
SECTIONS = ("data", "sde", "model", "training", "optim", "sampling", "eval")
# XLA's compiled programs are kept here between runs (a resumed or repeated run loads them instead of compiling).
CACHE_ENV = "JAXDIFF_COMPILATION_CACHE"
CACHE_MAX_BYTES = 4 << 30  # least recently used programs are dropped beyond this (it also turns on file locking)
CACHE_MIN_SECS_ENV = "JAXDIFF_COMPILATION_CACHE_MIN_SECS"  # programs compiled faster than this are not kept (1 s)


def default_compilation_cache() -> str:
    """``$JAXDIFF_COMPILATION_CACHE``, else ``$XDG_CACHE_HOME/jaxdiff/xla`` (``~/.cache/jaxdiff/xla``)."""
    if CACHE_ENV in os.environ:
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxdiff", "xla")


flags.DEFINE_string(
    "compilation_cache",
    default_compilation_cache(),
    f"directory of JAX's persistent compilation cache, shared by runs ('' turns it off; default from ${CACHE_ENV})",
)


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
    if config.get("score_sde") is not None:  # optional: the reference score function of an imported model
        from jaxdiff.compat import score_sde

        try:
            score_sde.reference_sde(config.score_sde)
            score_sde.network(config.score_sde)
        except score_sde.UnsupportedConfigError as e:  # "config.model.nf: ..." -> "config.score_sde.model.nf: ..."
            raise ConfigError("config.score_sde." + str(e).splitlines()[0].removeprefix("config.")) from None
    return config


def build_sde(config: ConfigDict) -> jaxdiff.SDE:
    """The forward SDE of ``config.sde`` (``N`` is the number of discrete levels)."""
    s = config.sde
    if s.name == "vesde":
        return jaxdiff.VESDE(sigma_min=s.sigma_min, sigma_max=s.sigma_max, N=s.num_scales)
    if s.name == "rectified_flow":  # alpha = 1 - t, sigma = t: no schedule parameters
        return jaxdiff.RectifiedFlow(N=s.num_scales)
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
    """``loss_fn(params, key, batch)`` of ``config.training`` (continuous DSM, DDPM / SMLD, or flow matching).

    ``training.objective`` (``"dsm"`` or ``"flow_matching"``), ``time_sampling``, ``logit_mean`` and
    ``logit_std`` are optional: a config without them (every config written before flow matching) trains DSM,
    and its saved ``config.json`` still matches it on resume.
    """
    t = config.training
    objective = dict(objective=t.get("objective", "dsm"), time_sampling=t.get("time_sampling", "uniform"),
                     logit_mean=t.get("logit_mean", 0.0), logit_std=t.get("logit_std", 1.0))  # fmt: skip
    try:
        return make_loss_fn(sde, model, continuous=t.continuous, likelihood_weighting=t.likelihood_weighting,
                            importance_sampling=t.importance_sampling, reduce_mean=t.reduce_mean,
                            label_dropout=t.label_dropout, train=train, **objective,
                            **_parameterization(config))  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"config.training: {str(e).splitlines()[0]}") from None


def build_score_fn(config: ConfigDict, sde, model, params, *, y=None, guidance_weight=None):
    """``score_fn(x, t)`` of a trained network (with labels and classifier-free guidance if given).

    A config with a ``score_sde`` section (written by ``import_score_sde.py`` for a reference model that
    jaxdiff's parameterization cannot express, such as a discrete-time DDPM or SMLD model) gets the reference's
    own score function, :func:`jaxdiff.compat.score_sde.reference_score_fn` with the settings stored there.
    A config without it (every other one) is unchanged.
    """
    if config.get("score_sde") is not None:
        from jaxdiff.compat import score_sde

        if y is not None or guidance_weight is not None:
            raise ConfigError("config.score_sde: a reference score_sde model takes no class labels")
        return score_sde.reference_score_fn(model, params, config.score_sde)
    return make_score_fn(model, params, sde, y=y, guidance_weight=guidance_weight, **_parameterization(config))


def build_optimizer(config: ConfigDict):
    """Adam(W) with warm-up and clipping from ``config.optim``."""
    o = config.optim
    return jaxdiff.train.make_optimizer(optimizer=o.optimizer, learning_rate=o.lr, warmup=o.warmup,
                                        grad_clip=o.grad_clip, beta1=o.beta1, eps=o.eps,
                                        weight_decay=o.weight_decay)  # fmt: skip


def load_workdir(workdir: str):
    """Reads a run back: ``WORKDIR/config.json`` and the EMA parameters of the newest readable checkpoint.

    Unreadable newer checkpoints are skipped and named (the fallback ``train.py`` uses); a missing or torn
    ``config.json`` falls back to the config saved with the checkpoint; non-finite parameters are refused.
    See :func:`workdir.load_run`.

    Returns:
      ``(config, params, step)``.
    """
    import workdir as workdir_lib

    return workdir_lib.load_run(workdir)


def _flag_value(argv, name: str) -> str | None:
    """The value of ``--name=V`` or ``--name V`` in ``argv`` (the last one), or ``None``."""
    value = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _unknown_config_key(argv) -> str | None:
    """The first ``--config.KEY`` override whose key the config file lacks, with the nearest valid key."""
    import difflib
    import importlib.util

    path = _flag_value(argv, "config")
    if not path or not os.path.isfile(path):
        return None
    try:
        spec = importlib.util.spec_from_file_location("_config_for_message", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception:  # noqa: BLE001 - the message falls back to the raw key
        return None
    for a in argv:
        if not a.startswith("--config."):
            continue
        key = a[len("--config.") :].split("=", 1)[0]
        node, done = config, []
        for part in key.split("."):
            if not isinstance(node, ConfigDict):
                break
            if part not in node:
                here = ".".join(done)
                near = difflib.get_close_matches(part, list(node.keys()), n=1)
                hint = f"; did you mean {'.'.join([*done, near[0]])}?" if near else ""
                valid = ", ".join(sorted(node.keys()))
                return f"unknown config key {key} (no {part!r} in {here or 'the config'}: {valid}){hint}"
            node = node[part]
            done.append(part)
    return None


def parse_flags(argv, flag_values=flags.FLAGS) -> None:
    """Parses ``argv`` (program name first); a bad flag or config override becomes a :class:`ConfigError`."""
    argv = list(argv)
    script = os.path.basename(argv[0]) if argv else "this script"
    path = _flag_value(argv, "config")
    if "config" in flag_values and path is not None and not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file (the configs are in experiments/configs/)")
    try:
        flag_values.unparse_flags()
        flag_values(argv)
    except flags.Error as e:
        first = str(e).splitlines()[0]
        if "config" not in flag_values and any(a.startswith("--config") for a in argv):
            raise ConfigError(
                f"--config: {script} reads the run's config from WORKDIR/config.json; pass --workdir alone "
                "(and this script's own flags, see --help)"
            ) from None
        if "config" in flag_values and "'config." in first:
            raise ConfigError(_unknown_config_key(argv) or first) from None
        raise ConfigError(first) from None
    except AttributeError as e:  # ml_collections: an override of a key the config does not have
        raise ConfigError(_unknown_config_key(argv) or f"unknown config key ({str(e).splitlines()[0]})") from None
    if "config" in flag_values:
        try:
            config = flag_values.config
            if config is None:
                raise ConfigError("--config is required (a file in experiments/configs/)")
            config.keys()
        except (AttributeError, OSError, ImportError, SyntaxError, NameError) as e:
            raise ConfigError(f"--config {path or ''}: cannot load it ({type(e).__name__})") from None
    if "workdir" in flag_values and not flag_values.workdir:
        raise ConfigError("--workdir is required")
    if not os.environ.get("JAXDIFF_TRACEBACK"):
        _quiet_background_errors()  # parsing the flags reset absl's verbosity
    if "compilation_cache" in flag_values:
        enable_compilation_cache(flag_values.compilation_cache)


def enable_compilation_cache(path: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in ``path`` (``''`` or ``None``: leaves it off).

    A program that took over a second (``$JAXDIFF_COMPILATION_CACHE_MIN_SECS``) to compile is stored under a key
    of its HLO, the compile options, the devices and the jax/jaxlib versions, so a changed program or another
    machine never reuses a stale entry.
    The cache is bounded (``CACHE_MAX_BYTES``, least recently used out) and file-locked, so concurrent runs
    share it. A directory that cannot be created is reported in one line and the run goes on uncached.

    Returns:
      The directory in use, or ``None``.
    """
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        print(f"note: --compilation_cache {path}: {e.strerror}; compiling without the cache", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ.get(CACHE_MIN_SECS_ENV, 1.0)))
    return path


def _quiet_background_errors() -> None:
    """Keeps the logs of background threads (orbax's asynchronous saves) off stderr.

    A failed background write (a full disk) would otherwise print hundreds of lines of tracebacks from every
    writer thread; the same failure reaches the main thread at the next save or at the end, and becomes one line.
    """
    import logging
    import threading

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.FATAL)  # also what parsing the flags would reset
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda args: None


def run_main(main, argv=None) -> int:
    """Runs ``main(argv)`` and turns every failure into one line on stderr and a non-zero exit code.

    Exit codes: 2 for a bad argument, config or work directory (:class:`ConfigError`), 3 for a result refused
    as non-finite (``workdir.Refused``), 1 for a failed read or write (a full or read-only disk) or anything
    unexpected (``JAXDIFF_TRACEBACK=1`` shows its traceback).
    """
    if not os.environ.get("JAXDIFF_TRACEBACK"):
        _quiet_background_errors()
    try:
        return main(sys.argv if argv is None else argv) or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        disk = e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO)
        kept = "; files written before are kept" if disk else ""
        print(f"error: {e.strerror or (str(e).splitlines() or [''])[0]}{where}{kept}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        from workdir import Refused  # workdir.py imports this module

        if isinstance(e, Refused):
            print(f"refused: {e}", file=sys.stderr)
            return e.code
        if os.environ.get("JAXDIFF_TRACEBACK"):
            raise
        text = (str(e).splitlines() or [""])[0]
        if "No space left on device" in text or "Read-only file system" in text:
            reason = "No space left on device" if "No space" in text else "Read-only file system"
            print(f"error: {reason} ({type(e).__name__} while writing: {text[:160]}); files written before are kept",
                  file=sys.stderr)  # fmt: skip
            return 1
        print(f"error: {type(e).__name__}: {text[:300]} (JAXDIFF_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1


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
