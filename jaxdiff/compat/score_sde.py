"""The reference score_sde implementation's checkpoints and configs, in jaxdiff.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021, published
its models as checkpoints of its JAX code (``yang-song/score_sde``): flax 0.3.1 msgpack files of ``run_lib``'s
``State(step, optimizer, lr, model_state, ema_rate, params_ema, rng)``, with ``optimizer = {target, state}``.
:func:`load_checkpoint` reads one with ``flax.serialization.msgpack_restore`` (no ``flax.optim``, no TensorFlow),
matches its parameters to jaxdiff's NCSN++ / DDPM++ / DDPM networks by name, and reproduces the reference's
``get_score_fn`` (its ``models/utils.py``), including what the reference network does that jaxdiff's leaves to
its caller:

* uncentred data (``data.centered = False``, the VE configs) enter the network as ``2 x - 1``;
* continuous VP / sub-VP: ``score = -model(x, 999 t) / std(t)`` (sub-VP always so);
* continuous VE: the network is fed ``sigma(t)`` (its Fourier features see ``log sigma``) and divides by it
  when ``model.scale_by_sigma``;
* discrete models take integer-valued labels: DDPM ``t (N - 1)`` with ``std = sqrt(1 - alphas_cumprod)`` at
  ``int(t (N - 1))``; SMLD (discrete VE) ``round((T - t)(N - 1))``, counted from ``sigma_max``, dividing by
  the ``label``-th of ``exp(linspace(log sigma_max, log sigma_min, N))``;
* the DDPM network of Ho et al. (``model.name = 'ddpm'``) normalises with 32 groups, which jaxdiff's
  ``min(C // 4, 32)`` groups equal only for ``C >= 128`` channels (``nf >= 128``, as in every published config).

>>> ckpt = load_checkpoint("exp/ve/cifar10_ncsnpp_continuous/checkpoint_24.msgpack",
...                        "configs/ve/cifar10_ncsnpp_continuous.py")  # doctest: +SKIP
>>> score = ckpt.score_fn()(x, t)  # doctest: +SKIP  (equal to the reference's get_score_fn(...)(x, t))

:meth:`ScoreSDECheckpoint.workdir` gives the same model as a config for ``experiments/`` with its parameters: in
jaxdiff's own conventions where they express it (continuous VE, VP and sub-VP models), otherwise with a
``score_sde`` section from which ``experiments/common.build_score_fn`` builds the reference score function above.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from ml_collections import ConfigDict

from jaxdiff.compat import _score_sde_names as names
from jaxdiff.compat._score_sde_config import (
    Spec,
    UnsupportedConfigError,
    load_config,
    network,
    parse,
    reference_only,
    reference_sde,
    reference_settings,
    rescales,
    workdir_config,
)
from jaxdiff.sde import SDE

__all__ = [
    "ScoreSDECheckpoint",
    "UnsupportedConfigError",
    "CheckpointMismatchError",
    "load_checkpoint",
    "load_config",
    "read_state",
    "network",
    "reference_only",
    "reference_sde",
    "reference_settings",
    "reference_score_fn",
    "reference_network",
    "to_reference_params",
    "workdir_config",
]

PyTree = Any


class CheckpointMismatchError(ValueError):
    """A checkpoint whose parameters do not fit its config; the one-line message names the first ones."""


def _checkpoint_file(path: str) -> str:
    """``path`` itself, or the newest ``checkpoint_<n>`` in a directory."""
    if os.path.isdir(path):
        found = [f for f in os.listdir(path) if re.fullmatch(r"checkpoint_\d+", f)]
        if not found:
            raise CheckpointMismatchError(f"{path}: no checkpoint_<n> file in this directory")
        path = os.path.join(path, max(found, key=lambda f: int(f.split("_")[1])))
    return path


def read_state(path: str | os.PathLike) -> dict:
    """The reference ``State`` as nested dicts of numpy arrays (``optimizer``, ``params_ema``, ``step``, ...).

    Args:
      path: a ``checkpoint_<n>`` file, or a directory of them (the newest is read).
    """
    from flax import serialization

    path = _checkpoint_file(os.fspath(path))
    with open(path, "rb") as f:
        raw = f.read()
    try:
        state = serialization.msgpack_restore(raw)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types for a file of another format
        raise CheckpointMismatchError(f"{path}: not a msgpack checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "optimizer" not in state or "params_ema" not in state:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointMismatchError(f"{path}: not a score_sde State (no optimizer/params_ema; has {keys})")
    if "target" not in state["optimizer"]:
        raise CheckpointMismatchError(f"{path}: the optimizer has no target (keys {sorted(state['optimizer'])})")
    return state


# ----------------------------------------------------------------------------------------------------------
# The reference score function
# ----------------------------------------------------------------------------------------------------------
def _sigmas(sde: SDE) -> jax.Array:
    """The SMLD noise levels ``utils.get_sigmas``, from ``sigma_max`` down to ``sigma_min``."""
    return jnp.exp(jnp.linspace(math.log(sde.sigma_max), math.log(sde.sigma_min), sde.N))


@dataclasses.dataclass(frozen=True)
class _ReferenceScore:
    """``get_score_fn(sde, model, params, ..., continuous)`` of the reference (``models/utils.py``)."""

    model: nn.Module
    sde: SDE
    spec: Spec

    def network(self, params: PyTree, x: jax.Array, labels: jax.Array) -> jax.Array:
        """What the reference network returns for ``model.apply(variables, x, labels, train=False)``."""
        spec = self.spec
        h = x if spec.centered else 2.0 * x - 1.0  # the reference network maps [0, 1] data to [-1, 1] itself
        if spec.embedding_type == "fourier":  # labels are sigma (VE) or 999 t (VP); the features see their log
            cond, sigma = jnp.log(labels), labels
        else:  # integer-valued labels; a discrete VE model divides by the labels-th SMLD sigma
            cond = jnp.asarray(labels, x.dtype)
            sigma = _sigmas(self.sde)[jnp.asarray(labels).astype(jnp.int32)] if spec.scale_by_sigma else None
        out = self.model.apply({"params": params}, h, cond, train=False)
        if spec.scale_by_sigma:
            out = out / jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1))
        return out

    def __call__(self, params: PyTree, x: jax.Array, t: jax.Array) -> jax.Array:
        spec, sde = self.spec, self.sde
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        if spec.sde == "vesde":
            if spec.continuous:
                labels = sde.sigma(t)
            else:  # SMLD: label 0 is sigma_max
                labels = jnp.round((sde.T - t) * (sde.N - 1)).astype(jnp.int32)
            return self.network(params, x, labels)
        if spec.continuous or spec.sde == "subvpsde":
            labels, std = 999.0 * t, sde.sigma(t)
        else:  # DDPM's discrete chain: betas linspace(beta_min / N, beta_max / N, N)
            labels = t * (sde.N - 1)
            betas = jnp.linspace(sde.beta_min / sde.N, sde.beta_max / sde.N, sde.N)
            std = jnp.sqrt(1.0 - jnp.cumprod(1.0 - betas))[labels.astype(jnp.int32)]
        out = self.network(params, x, labels)
        return -out / jnp.reshape(std, (-1,) + (1,) * (x.ndim - 1))


def reference_network(model: nn.Module, params: PyTree, config: Any) -> Partial:
    """``network(x, labels)``: the reference network's output (``model.apply(variables, x, labels)``).

    ``labels`` are what the reference feeds: ``sigma(t)`` (continuous VE), ``999 t`` (continuous VP / sub-VP)
    or the integer labels of discrete models.
    """
    config = load_config(config)
    return Partial(_ReferenceScore(model, reference_sde(config), parse(config)).network, params)


def reference_score_fn(model: nn.Module, params: PyTree, config: Any) -> Partial:
    """The reference's score function of a jaxdiff ``model`` with ``params``, as a ``score_fn(x, t)``.

    ``x`` is in the reference's data range (``[0, 1]`` unless ``data.centered``) and ``t`` in ``[0, T]``; the
    parameters are the leaves of the returned :class:`jax.tree_util.Partial`.
    """
    config = load_config(config)
    return Partial(_ReferenceScore(model, reference_sde(config), parse(config)), params)


def to_reference_params(params: PyTree, config: Any) -> dict:
    """jaxdiff ``params`` of :func:`network` renamed as the reference's checkpoint names them."""
    return names.to_reference(jax.device_get(params), ddpm=parse(load_config(config)).ddpm)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScoreSDECheckpoint:
    """A reference checkpoint in jaxdiff.

    Attributes:
      model: jaxdiff's network (``NCSNpp`` / ``DDPMpp``), with the reference's architecture.
      params: the optimiser's target (``State.optimizer.target``), in jaxdiff's names.
      ema_params: ``State.params_ema`` (what the paper samples and evaluates with).
      sde: the forward SDE as the reference defines it, on the reference's data range.
      step: ``State.step``.
      config: the equivalent jaxdiff config (sections ``data``, ``sde``, ``model``, ... of ``experiments/``,
        see :meth:`workdir`), or ``None`` for a data set jaxdiff cannot read.
      reference_config: the reference ConfigDict.
    """

    model: nn.Module
    params: PyTree
    ema_params: PyTree
    sde: SDE
    step: int
    config: ConfigDict | None
    reference_config: ConfigDict

    def score_fn(self, ema: bool = True) -> Partial:
        """The reference's ``get_score_fn(sde, model, params, ..., train=False, continuous)`` as ``score_fn(x, t)``.

        Args:
          ema: use the EMA parameters (else the optimiser's target).
        """
        return reference_score_fn(self.model, self.ema_params if ema else self.params, self.reference_config)

    def workdir(self, ema: bool = True) -> tuple[ConfigDict, PyTree]:
        """``(config, params)`` for ``experiments/``: ``build_score_fn`` on them is this model's score.

        jaxdiff's networks take data as they are and are fed ``log sigma(t)`` (Fourier) or ``999 t``
        (positional). The continuous models map onto that exactly, and ``make_score_fn`` on the config's
        ``model.parameterization`` and ``scale_by_sigma`` is their score:

        * VP / sub-VP (centred data): unchanged, ``parameterization='eps'``;
        * VE on uncentred data: the model is expressed in the coordinates its network sees, ``y = 2 x - 1``
          (``data.centered = True``), where the SDE is the VE SDE with twice the sigmas and the score is half
          the reference's. The network is then fed ``log(2 sigma)``; the Fourier features of ``log sigma`` are
          a fixed rotation of those of ``log(2 sigma)``, folded into the first dense layer. Sampling and
          bits/dim are unchanged by the change of coordinates, except that the VE prior ``N(0, sigma_max^2)``
          is centred at ``y = 0`` rather than at the reference's ``x = 0``.

        The others (:func:`reference_only` names the key: discrete-time DDPM and SMLD models, Fourier features
        with a VP SDE, uncentred VP data, uncentred VE data without ``scale_by_sigma``) keep the reference's
        data range, SDE and parameters, and the config's section ``score_sde`` (:func:`reference_settings`)
        tells ``experiments/common.build_score_fn`` to use :func:`reference_score_fn`: the samplers and the
        likelihood then see exactly ``get_score_fn(..., continuous=training.continuous)`` of the reference.

        Raises:
          UnsupportedConfigError: a data set jaxdiff cannot read (``data.dataset``).
        """
        return workdir_config(self.reference_config), _workdir_params(
            self.ema_params if ema else self.params, parse(self.reference_config)
        )


def load_checkpoint(path: str | os.PathLike, config: Any) -> ScoreSDECheckpoint:
    """Loads a score_sde checkpoint with its config.

    Args:
      path: a reference ``checkpoint_<n>`` file (or a directory of them: the newest).
      config: the reference config: a ``ml_collections.ConfigDict``, a dict, its JSON file, or a reference
        config file (``configs/ve/cifar10_ncsnpp_continuous.py`` ...) with the reference repository on
        ``sys.path``.

    Returns:
      A :class:`ScoreSDECheckpoint`.

    Raises:
      UnsupportedConfigError: a config jaxdiff cannot represent (the message names the key).
      CheckpointMismatchError: parameters that do not fit the config (the message names the first ones).

    Example:
      >>> ckpt = load_checkpoint("checkpoints/checkpoint_1", "config.json")  # doctest: +SKIP
      >>> x0, info = jaxdiff.sample(key, ckpt.score_fn(), ckpt.sde, (16, 32, 32, 3), method="pc")  # doctest: +SKIP
    """
    reference = load_config(config)
    spec = parse(reference)
    model = network(reference)
    x = jax.ShapeDtypeStruct((1, *spec.shape), jnp.float32)
    expected = jax.eval_shape(model.init, jax.random.key(0), x, jax.ShapeDtypeStruct((1,), jnp.float32))["params"]
    state = read_state(path)
    trees = {}
    for field, tree in (("optimizer.target", state["optimizer"]["target"]), ("params_ema", state["params_ema"])):
        problems = names.mismatches(tree, expected, ddpm=spec.ddpm)
        if problems:
            more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
            raise CheckpointMismatchError(
                f"{os.fspath(path)}: {field} does not match the config: {'; '.join(problems[:2])}{more}"
            )
        trees[field] = jax.tree.map(jnp.asarray, names.from_reference(tree, expected, ddpm=spec.ddpm))
    try:
        jd_config = workdir_config(reference)
    except UnsupportedConfigError:
        jd_config = None
    return ScoreSDECheckpoint(
        model=model,
        params=trees["optimizer.target"],
        ema_params=trees["params_ema"],
        sde=reference_sde(reference),
        step=int(np.asarray(state["step"])),
        config=jd_config,
        reference_config=reference,
    )


# ----------------------------------------------------------------------------------------------------------
# jaxdiff's own conventions: the parameters of a work directory
# ----------------------------------------------------------------------------------------------------------
def _workdir_params(params: PyTree, spec: Spec) -> PyTree:
    if not rescales(spec):
        return params
    # jaxdiff feeds log(2 sigma) = log(sigma) + log 2. With a = 2 pi W, the reference's features are
    # [sin(a s), cos(a s)] = R(a log 2) [sin(a s'), cos(a s')] for s' = s + log 2: fold R into temb_dense_0.
    w = np.asarray(params["fourier_proj"]["W"], np.float64)
    theta = (2 * np.pi * w * math.log(2.0))[:, None]
    kernel = np.asarray(params["temb_dense_0"]["kernel"], np.float64)
    k_sin, k_cos = kernel[: len(w)], kernel[len(w) :]
    folded = np.concatenate(
        [np.cos(theta) * k_sin + np.sin(theta) * k_cos, -np.sin(theta) * k_sin + np.cos(theta) * k_cos]
    )
    out = jax.tree.map(lambda a: a, dict(params))
    out["temb_dense_0"] = dict(params["temb_dense_0"], kernel=jnp.asarray(folded, jnp.float32))
    return out
