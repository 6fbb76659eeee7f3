"""The reference score_sde configs: what network, SDE and score convention one describes, and its jaxdiff config.

The reference's ``ml_collections`` ConfigDicts (``configs/{ve,vp,subvp}/*.py`` in ``yang-song/score_sde``) are
read as they are; every key that changes the network or the score function is either translated or refused
with a one-line :class:`UnsupportedConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
from ml_collections import ConfigDict

from jaxdiff.models import get_model
from jaxdiff.sde import SDE, VESDE, VPSDE, SubVPSDE

__all__ = [
    "UnsupportedConfigError",
    "Spec",
    "parse",
    "reference_only",
    "reference_settings",
    "rescales",
    "load_config",
    "network",
    "reference_sde",
    "workdir_config",
]


# Reference config.model keys and the values jaxdiff's networks can represent (None: any value).
_FIXED = {"nonlinearity": "swish", "normalization": "GroupNorm", "conv_size": 3, "attention_type": "ddpm"}
_MODEL_KEYS = {
    *_FIXED,
    *("name", "nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "conditional"),
    *("fir", "fir_kernel", "skip_rescale", "resblock_type", "progressive", "progressive_input"),
    *("progressive_combine", "embedding_type", "fourier_scale", "init_scale", "scale_by_sigma", "ema_rate"),
    *("sigma_min", "sigma_max", "num_scales", "beta_min", "beta_max"),
}
_NCSNPP_KEYS = ("fir", "fir_kernel", "skip_rescale", "resblock_type", "progressive", "progressive_input")
_NCSNPP_KEYS += ("progressive_combine", "embedding_type", "fourier_scale", "init_scale")
_SDES = ("vesde", "vpsde", "subvpsde")
_DATASETS = {"CIFAR10": ("cifar10", 32), "CELEBA": ("celeba", 64), "MNIST": ("mnist", 28)}
_PREDICTORS = {"euler_maruyama": "euler_maruyama", "reverse_diffusion": "reverse_diffusion"}
_PREDICTORS.update({"ancestral_sampling": "ancestral", "none": None})
_CORRECTORS = {"langevin": "langevin", "ald": "ald", "none": None}


class UnsupportedConfigError(ValueError):
    """A reference config jaxdiff cannot represent; the one-line message names the key."""


def _fail(key: str, message: str):
    raise UnsupportedConfigError(f"config.{key}: {message}")


# ----------------------------------------------------------------------------------------------------------
# Reading: the reference config and the msgpack state
# ----------------------------------------------------------------------------------------------------------
def load_config(config: Any) -> ConfigDict:
    """The reference ConfigDict from a ConfigDict, a dict, a JSON file or a reference config ``.py`` file.

    A reference config file imports ``configs.default_*_configs``: put the score_sde repository root on
    ``sys.path`` first.
    """
    if isinstance(config, ConfigDict):
        return config
    if isinstance(config, Mapping):
        return ConfigDict(dict(config))
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise UnsupportedConfigError(f"reference config {path}: no such file")
    if path.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_score_sde_config_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            return module.get_config()
        except (ImportError, AttributeError, SyntaxError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UnsupportedConfigError(
                f"reference config {path}: cannot load it ({type(e).__name__}: {first}); put the score_sde "
                "repository root on sys.path (PYTHONPATH)"
            ) from None
    try:
        with open(path) as f:
            return ConfigDict(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnsupportedConfigError(f"reference config {path}: not JSON ({e})") from None


def _get(config: ConfigDict, key: str):
    node = config
    for part in key.split("."):
        if part not in node:
            _fail(key, "missing (is this a score_sde config?)")
        node = node[part]
    return node


# ----------------------------------------------------------------------------------------------------------
# The config: what network, SDE and score convention it describes
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything of a reference config that fixes the score function."""

    model_name: str  # the reference's: 'ncsnpp' or 'ddpm'
    kwargs: tuple  # jaxdiff network attributes, as sorted (name, value) pairs
    sde: str
    continuous: bool
    centered: bool
    embedding_type: str
    scale_by_sigma: bool
    shape: tuple[int, int, int]

    @property
    def ddpm(self) -> bool:
        return self.model_name == "ddpm"


def parse(config: ConfigDict) -> Spec:
    m = _get(config, "model")
    name = _get(config, "model.name")
    if name not in ("ncsnpp", "ddpm"):
        _fail("model.name", f"{name!r} is not supported (NCSN++/DDPM++ 'ncsnpp' and DDPM 'ddpm' are)")
    for key in sorted(m):
        if key not in _MODEL_KEYS:
            _fail(f"model.{key}", f"unknown to jaxdiff's networks (value {m[key]!r})")
        if key in _FIXED and str(m[key]) != str(_FIXED[key]):
            _fail(f"model.{key}", f"{m[key]!r} is not supported (only {_FIXED[key]!r})")
    sde = str(_get(config, "training.sde")).lower()
    if sde not in _SDES:
        _fail("training.sde", f"{sde!r} is not supported ({', '.join(_SDES)})")
    continuous = bool(_get(config, "training.continuous"))
    centered = bool(_get(config, "data.centered"))
    scale_by_sigma = bool(_get(config, "model.scale_by_sigma"))
    common = dict(
        nf=int(_get(config, "model.nf")),
        ch_mult=tuple(int(c) for c in _get(config, "model.ch_mult")),
        num_res_blocks=int(_get(config, "model.num_res_blocks")),
        attn_resolutions=tuple(int(r) for r in _get(config, "model.attn_resolutions")),
        dropout=float(_get(config, "model.dropout")),
        resamp_with_conv=bool(_get(config, "model.resamp_with_conv")),
        conditional=bool(_get(config, "model.conditional")),
    )
    if name == "ddpm":
        embedding = "positional"  # models/ddpm.py ignores model.embedding_type
        kwargs = dict(common, resblock_type="ddpm", skip_rescale=False, fir=False, progressive="none",
                      progressive_input="none", embedding_type="positional", init_scale=0.0)  # fmt: skip
        channels = [common["nf"] * c for c in common["ch_mult"]]
        if min(channels) < 128:
            _fail("model.nf", f"{common['nf']} gives {min(channels)} channels; the DDPM network's GroupNorm has 32 "
                  "groups, which jaxdiff's min(C // 4, 32) matches only from 128 channels")  # fmt: skip
    else:
        kwargs = dict(common, **{k: _get(config, f"model.{k}") for k in _NCSNPP_KEYS})
        kwargs["fir_kernel"] = tuple(int(k) for k in kwargs["fir_kernel"])
        kwargs["fourier_scale"] = float(kwargs["fourier_scale"])
        embedding = str(kwargs["embedding_type"]).lower()
    if embedding == "fourier" and not continuous:
        _fail("model.embedding_type", "'fourier' needs training.continuous = True (as the reference asserts)")
    if sde == "vesde" and continuous and embedding != "fourier":
        _fail("model.embedding_type", f"{embedding!r} with a continuous VE SDE (the reference feeds sigma(t))")
    if sde != "vesde" and scale_by_sigma:
        _fail("model.scale_by_sigma", f"True with {sde} (the reference divides by the VE sigmas there)")
    size, channels = int(_get(config, "data.image_size")), int(_get(config, "data.num_channels"))
    return Spec(name, tuple(sorted(kwargs.items())), sde, continuous, centered, embedding, scale_by_sigma,
                 (size, size, channels))  # fmt: skip


def network(config: Any) -> nn.Module:
    """jaxdiff's network for a reference config (same parameters, same output on ``2 x - 1`` if uncentred)."""
    spec = parse(load_config(config))
    return get_model("ddpmpp" if spec.ddpm else "ncsnpp", **dict(spec.kwargs))


def reference_sde(config: Any) -> SDE:
    """The forward SDE of a reference config (its ``model.sigma_*``, ``beta_*``, ``num_scales``)."""
    config = load_config(config)
    sde, n = str(_get(config, "training.sde")).lower(), int(_get(config, "model.num_scales"))
    if sde == "vesde":
        return VESDE(sigma_min=float(_get(config, "model.sigma_min")),
                     sigma_max=float(_get(config, "model.sigma_max")), N=n)  # fmt: skip
    cls = {"vpsde": VPSDE, "subvpsde": SubVPSDE}.get(sde)
    if cls is None:
        _fail("training.sde", f"{sde!r} is not supported ({', '.join(_SDES)})")
    return cls(beta_min=float(_get(config, "model.beta_min")), beta_max=float(_get(config, "model.beta_max")), N=n)


# ----------------------------------------------------------------------------------------------------------
# jaxdiff's own conventions: the config and parameters of a work directory
# ----------------------------------------------------------------------------------------------------------
def reference_only(config: Any) -> str | None:
    """What keeps a model out of jaxdiff's own parameterization (``'key: why'``), or ``None``.

    Such a model is exported with the reference's own score function (the ``score_sde`` section of its jaxdiff
    config, see :func:`workdir_config`).

    Args:
      config: a reference config (as :func:`load_config` reads it) or its :class:`Spec`.
    """
    spec = config if isinstance(config, Spec) else parse(load_config(config))
    if not spec.continuous:
        return "training.continuous: False (integer noise labels of a discrete chain)"
    if spec.sde != "vesde" and spec.embedding_type == "fourier":
        return f"model.embedding_type: 'fourier' with {spec.sde} (its features see log(999 t), not log sigma(t))"
    if spec.sde != "vesde" and not spec.centered:
        return f"data.centered: False with {spec.sde} (not a {spec.sde} in the network's coordinates 2 x - 1)"
    if spec.sde == "vesde" and not spec.centered and not spec.scale_by_sigma:
        return "model.scale_by_sigma: False with uncentred VE data (the network's output is not rescaled)"
    return None


def rescales(spec: Spec) -> bool:
    """Whether the model is re-expressed in the network's coordinates ``y = 2 x - 1``."""
    return spec.sde == "vesde" and not spec.centered and reference_only(spec) is None


def reference_settings(config: Any) -> ConfigDict:
    """The part of a reference config that fixes its score function (``data``, ``training``, ``model`` keys).

    :func:`jaxdiff.compat.score_sde.reference_score_fn` accepts it in place of the whole config.
    """
    ref = load_config(config)
    spec = parse(ref)
    return ConfigDict(dict(
        data=dict(centered=spec.centered, image_size=spec.shape[0], num_channels=spec.shape[2]),
        training=dict(sde=spec.sde, continuous=spec.continuous),
        model={k: ref.model[k] for k in sorted(ref.model)},
    ))  # fmt: skip


def workdir_config(config: Any) -> ConfigDict:
    """The jaxdiff config (the sections of ``experiments/configs/*.py``) equivalent to a reference config.

    A model that jaxdiff's parameterization expresses (:func:`reference_only` is ``None``) gets a plain jaxdiff
    config. Any other (discrete-time models, Fourier features with a VP SDE, ...) keeps the reference's data
    range and SDE, and its config carries a section ``score_sde``: the :func:`reference_settings` from which
    ``experiments/common.build_score_fn`` builds the reference's own score function. See
    :meth:`ScoreSDECheckpoint.workdir`.

    Raises:
      UnsupportedConfigError: a config :func:`parse` refuses, or a data set jaxdiff cannot read.
    """
    ref = load_config(config)
    spec = parse(ref)
    scale = 2.0 if rescales(spec) else 1.0
    dataset = str(_get(ref, "data.dataset"))
    if dataset.upper() not in _DATASETS:
        _fail("data.dataset", f"{dataset!r}: jaxdiff reads {', '.join(_DATASETS)} (others as an image_folder)")
    name, native_size = _DATASETS[dataset.upper()]
    tr, sa, op = ref.training, ref.sampling, ref.optim

    c = ConfigDict()
    c.name = f"score_sde_{dataset.lower()}_{spec.sde}_{spec.model_name}"
    c.seed = int(ref.get("seed", 42))
    c.data = ConfigDict(dict(dataset=name, image_size=None if spec.shape[0] == native_size else spec.shape[0],
                             centered=True if scale == 2.0 else spec.centered,
                             random_flip=bool(ref.data.get("random_flip", True)),
                             dequantize=bool(ref.data.get("uniform_dequantization", False))))  # fmt: skip
    c.sde = ConfigDict(dict(name=spec.sde, beta_min=float(ref.model.beta_min), beta_max=float(ref.model.beta_max),
                            sigma_min=scale * float(ref.model.sigma_min), sigma_max=scale * float(ref.model.sigma_max),
                            num_scales=int(ref.model.num_scales)))  # fmt: skip
    c.model = ConfigDict(dict(spec.kwargs))
    c.model.name = "ddpmpp" if spec.ddpm else "ncsnpp"
    c.model.parameterization = "score" if spec.sde == "vesde" else "eps"
    c.model.scale_by_sigma = spec.scale_by_sigma
    c.model.ema_rate = float(ref.model.ema_rate)
    c.training = ConfigDict(dict(batch_size=int(tr.batch_size), n_iters=int(tr.n_iters), continuous=spec.continuous,
                                 reduce_mean=bool(tr.reduce_mean), likelihood_weighting=bool(tr.likelihood_weighting),
                                 importance_sampling=False, label_dropout=0.0, log_every=int(tr.get("log_freq", 50)),
                                 save_every=int(tr.get("snapshot_freq_for_preemption", 10000)), keep=3,
                                 progress_bar=True))  # fmt: skip
    c.optim = ConfigDict(dict(optimizer=str(op.optimizer).lower(), lr=float(op.lr), warmup=int(op.warmup),
                              grad_clip=float(op.grad_clip), beta1=float(op.beta1), eps=float(op.eps),
                              weight_decay=float(op.weight_decay)))  # fmt: skip
    # run_lib samples from t = 1e-3 (VP, sub-VP) or 1e-5 (VE) with N = num_scales steps.
    eps = 1e-5 if spec.sde == "vesde" else 1e-3
    if str(sa.get("method", "pc")).lower() == "ode":
        method, options = "ode", dict(rtol=1e-5, atol=1e-5, eps=eps, denoise=bool(sa.get("noise_removal", True)))
    else:
        predictor, corrector = str(sa.get("predictor", "none")).lower(), str(sa.get("corrector", "none")).lower()
        if predictor not in _PREDICTORS:
            _fail("sampling.predictor", f"{predictor!r} is not supported ({', '.join(_PREDICTORS)})")
        if corrector not in _CORRECTORS:
            _fail("sampling.corrector", f"{corrector!r} is not supported ({', '.join(_CORRECTORS)})")
        method = "pc"
        options = dict(predictor=_PREDICTORS[predictor], corrector=_CORRECTORS[corrector], snr=float(sa.snr),
                       corrector_steps=int(sa.get("n_steps_each", 1)), eps=eps,
                       denoise=bool(sa.get("noise_removal", True)))  # fmt: skip
    # A discrete model knows only its N labels: N - 1 steps put the grid linspace(T, eps, N) on them, as the
    # reference's samplers do, the final denoising step taking the place of the reference's last step.
    steps = int(ref.model.num_scales) - (0 if spec.continuous else 1)
    c.sampling = ConfigDict(dict(method=method, steps=steps, options=ConfigDict(options)))
    c.eval = ConfigDict(dict(enabled=True, num_samples=64, grid_size=64, likelihood_examples=256,
                             hutchinson_probes=1, ode_tol=1e-5, density_grid=0, plot_range=(-3.0, 3.0),
                             quality=False))  # fmt: skip
    if reference_only(spec) is not None:  # build_score_fn builds the reference's score function from these
        c.score_sde = reference_settings(ref)
    return c
