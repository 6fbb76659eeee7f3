"""From a network's output to the score, for any SDE: score, eps, x0, v and EDM parameterizations.

Every SDE of :mod:`jaxdiff.sde` perturbs data as ``x_t = alpha(t) x_0 + sigma(t) eps``. Given ``(x, alpha,
sigma)`` the four usual regression targets are affine functions of one another:

    score = -eps / sigma                                  (grad log p_{0t}(x_t | x_0), eq. 7 of Song et al.)
    x0    = (x - sigma eps) / alpha                       (Tweedie: E[x_0 | x_t] = (x + sigma^2 score) / alpha)
    v     = alpha eps - sigma x0                          (Salimans & Ho, 2022)
    eps   = (alpha v + sigma x) / (alpha^2 + sigma^2),    x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)

and the flow-matching velocity (target ``'velocity'``, Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024),

    u     = eps - x0,
    eps   = (x + alpha u) / (alpha + sigma),              x0 = (x - sigma u) / (alpha + sigma).

``u`` is the velocity ``d x_t / dt`` of the linear path of :class:`jaxdiff.sde.RectifiedFlow` (``alpha = 1 - t``,
``sigma = t``, so ``alpha + sigma = 1``: ``eps = x + (1 - t) u``, ``x0 = x - t u``); the conversions hold for any
``alpha, sigma`` with ``alpha + sigma > 0``. It is not the diffusion ``v`` above: on the linear path
``v = alpha eps - sigma x0`` weighs the two by ``1 - t`` and ``t``, ``u`` by ``1`` and ``-1``. Code that writes the
linear path the other way round (``x_t' = t' x0 + (1 - t') eps``, ``t' = 1 - t``, velocity ``x0 - eps``) has
``u' = -u``. Score and ``eps`` outputs determine ``x0`` only through ``alpha``: at ``t = 1`` (``alpha = 0``) a
score or noise prediction says nothing about the data, and converting it to ``x0`` or ``u`` there is ``0 / 0``;
a velocity or ``x0`` network is finite there, and its score is exactly ``-x`` at ``t = 1``.

Applied to the *exact* score these give the posterior means ``E[eps | x_t]`` and ``E[x_0 | x_t]``; applied to a
network output they turn any parameterization into any other. EDM's preconditioned denoiser (Karras et al.,
2022, Table 1) is written for ``x_edm = x_0 + sigma_edm n``; here ``x_edm = x_t / alpha`` and
``sigma_edm = sigma / alpha``, so it serves every SDE too:

    D(x_edm) = c_skip x_edm + c_out F(c_in x_edm, c_noise),
    c_skip = sigma_data^2 / (sigma_edm^2 + sigma_data^2),   c_out = sigma_edm sigma_data / sqrt(sigma_edm^2 +
    sigma_data^2),   c_in = 1 / sqrt(sigma_edm^2 + sigma_data^2),   c_noise = log(sigma_edm) / 4,

and ``D`` estimates ``x_0``.

:class:`ScoreModel` ties a Flax network to an SDE and a :class:`Parameterization`; :func:`make_score_fn`
returns the ``score_fn(x, t)`` that samplers and likelihoods take, as a :class:`jax.tree_util.Partial` whose
leaves are the parameters, so a sampler compiled once serves every checkpoint.

>>> from jaxdiff.models import MLP
>>> from jaxdiff.sde import VPSDE
>>> model, sde = MLP(hidden_sizes=(16,), embedding_type="positional"), VPSDE()
>>> params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
>>> score_fn = make_score_fn(model, params, sde, parameterization="eps")
>>> score_fn(jnp.zeros((4, 2)), jnp.full((4,), 0.5)).shape
(4, 2)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.tree_util import Partial
from jaxtyping import Array, Float

from jaxdiff.per_example import per_example, unwrap
from jaxdiff.sde import SDE, batch_broadcast

__all__ = [
    "OUTPUTS",
    "TARGETS",
    "EMBEDDING_TYPES",
    "Parameterization",
    "ScoreModel",
    "make_score_fn",
    "noise_cond",
    "convert",
    "to_eps",
    "from_eps",
    "edm_coefficients",
]

TARGETS = ("score", "eps", "x0", "v", "velocity")
OUTPUTS = TARGETS + ("edm",)
EMBEDDING_TYPES = ("fourier", "positional")

PyTree = Any


# ----------------------------------------------------------------------------------------------------------
# Pure conversions between score, eps, x0 and v (through eps)
# ----------------------------------------------------------------------------------------------------------
def _bc(a: Array, x: Array) -> Array:
    return batch_broadcast(jnp.asarray(a, x.dtype), x)


def to_eps(kind: str, value: Float[Array, " b *d"], x: Float[Array, " b *d"], alpha, sigma) -> Float[Array, " b *d"]:
    """Converts a prediction of ``kind`` (``'score'``, ``'eps'``, ``'x0'``, ``'v'``, ``'velocity'``) to ``eps``.

    Args:
      kind: what ``value`` predicts.
      value: the prediction, shaped like ``x``.
      x: the noisy input ``x_t``.
      alpha: ``alpha(t)``, a scalar or per-example ``(batch,)``.
      sigma: ``sigma(t)``, likewise.
    """
    a, s = _bc(alpha, x), _bc(sigma, x)
    if kind == "eps":
        return value
    if kind == "score":  # score = -eps / sigma
        return -s * value
    if kind == "x0":  # x = alpha x0 + sigma eps
        return (x - a * value) / s
    if kind == "v":  # v = alpha eps - sigma x0, solved with x = alpha x0 + sigma eps
        return (a * value + s * x) / (a**2 + s**2)
    if kind == "velocity":  # u = eps - x0, solved with x = alpha x0 + sigma eps
        return (x + a * value) / (a + s)
    raise ValueError(f"unknown prediction {kind!r}; valid: {', '.join(TARGETS)}")


def from_eps(kind: str, eps: Float[Array, " b *d"], x: Float[Array, " b *d"], alpha, sigma) -> Float[Array, " b *d"]:
    """Converts a noise prediction ``eps`` into ``kind`` (``'score'``, ``'eps'``, ``'x0'``, ``'v'``, ``'velocity'``)."""
    a, s = _bc(alpha, x), _bc(sigma, x)
    if kind == "eps":
        return eps
    if kind == "score":
        return -eps / s
    if kind == "x0":
        return (x - s * eps) / a
    if kind == "v":
        return a * eps - s * (x - s * eps) / a
    if kind == "velocity":  # eps - (x - sigma eps) / alpha
        return ((a + s) * eps - x) / a
    raise ValueError(f"unknown prediction {kind!r}; valid: {', '.join(TARGETS)}")


def convert(value: Float[Array, " b *d"], x: Float[Array, " b *d"], alpha, sigma, *, source: str, target: str):
    """Converts a prediction from ``source`` to ``target`` (each one of :data:`TARGETS`).

    The x0 and v targets are computed directly from the source where that avoids a division by a small
    ``sigma`` (x0 from the score: Tweedie's formula ``(x + sigma^2 score) / alpha``).

    >>> x, eps = jnp.ones((2, 3)), jnp.zeros((2, 3))
    >>> convert(eps, x, 1.0, 0.5, source="eps", target="x0").tolist()[0]
    [1.0, 1.0, 1.0]
    """
    if source == target:
        if source not in TARGETS:
            raise ValueError(f"unknown prediction {source!r}; valid: {', '.join(TARGETS)}")
        return value
    if source == "score" and target == "x0":  # Tweedie's formula
        return (x + _bc(sigma, x) ** 2 * value) / _bc(alpha, x)
    if source == "v" and target == "x0":
        a, s = _bc(alpha, x), _bc(sigma, x)
        return (a * x - s * value) / (a**2 + s**2)
    if source == "velocity" and target == "x0":  # finite at alpha = 0
        return (x - _bc(sigma, x) * value) / (_bc(alpha, x) + _bc(sigma, x))
    if source == "x0" and target == "velocity":  # finite at alpha = 0
        a, s = _bc(alpha, x), _bc(sigma, x)
        return (x - (a + s) * value) / s
    return from_eps(target, to_eps(source, value, x, alpha, sigma), x, alpha, sigma)


def edm_coefficients(sigma_edm: Array, sigma_data: float) -> tuple[Array, Array, Array, Array]:
    """``(c_skip, c_out, c_in, c_noise)`` of EDM's preconditioning (Karras et al., 2022, Table 1)."""
    s2, d2 = sigma_edm**2, sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma_edm * sigma_data * jax.lax.rsqrt(s2 + d2)
    c_in = jax.lax.rsqrt(s2 + d2)
    c_noise = 0.25 * jnp.log(sigma_edm)
    return c_skip, c_out, c_in, c_noise


# ----------------------------------------------------------------------------------------------------------
# Noise conditioning
# ----------------------------------------------------------------------------------------------------------
def noise_cond(t: Float[Array, " b"], sde: SDE, embedding_type: str) -> Float[Array, " b"]:
    """The network's noise-level input, with the score-SDE reference code's conventions.

    ``'fourier'`` (NCSN++, VE): ``log sigma(t)``; ``'positional'`` (DDPM++, VP): ``999 t``, the DDPM
    timestep for ``N = 1000`` (Song et al., ICLR 2021, Appendix H.1).
    """
    if embedding_type == "fourier":
        return jnp.log(sde.sigma(t))
    if embedding_type == "positional":
        return 999.0 * t
    raise ValueError(f"unknown embedding_type {embedding_type!r}; valid: {', '.join(EMBEDDING_TYPES)}")


# ----------------------------------------------------------------------------------------------------------
# The parameterization of a network, and a network bound to an SDE
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Parameterization:
    """What a network's raw output means, and what it is fed.

    Attributes:
      output: ``'score'``, ``'eps'``, ``'x0'``, ``'v'``, ``'velocity'`` (flow matching's ``eps - x0``) or ``'edm'``
        (the output is EDM's ``F``; the network
        sees ``c_in x / alpha`` and ``c_noise = log(sigma / alpha) / 4``).
      embedding_type: how ``t`` becomes the network's noise input (:func:`noise_cond`); ignored for ``'edm'``.
      scale_by_sigma: with ``output='score'``, the score is ``output / sigma`` (the reference code's
        ``scale_by_sigma`` option of its VE models, after Song & Ermon 2020).
      sigma_data: EDM's data standard deviation.
    """

    output: str = "eps"
    embedding_type: str = "positional"
    scale_by_sigma: bool = False
    sigma_data: float = 0.5

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"unknown parameterization {self.output!r}; valid: {', '.join(OUTPUTS)}")
        if self.embedding_type not in EMBEDDING_TYPES:
            raise ValueError(f"unknown embedding_type {self.embedding_type!r}; valid: {', '.join(EMBEDDING_TYPES)}")
        if self.scale_by_sigma and self.output != "score":
            raise ValueError(f"scale_by_sigma applies to output='score' only, got output={self.output!r}")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {self.sigma_data}")

    def __call__(self, network, x: Array, alpha: Array, sigma: Array, cond: Array, target: str):
        """Evaluates ``network(x_in, noise_cond)`` and returns the prediction ``target`` for ``x``.

        Args:
          network: ``(x_in, noise_cond) -> output`` (the Flax module with its parameters bound).
          x: noisy data ``x_t``.
          alpha: ``alpha`` of the perturbation at ``t`` (per example).
          sigma: ``sigma`` of the perturbation at ``t`` (per example).
          cond: the noise-conditioning input for the non-EDM outputs.
          target: one of :data:`TARGETS`.
        """
        if self.output == "edm":
            sigma_edm = sigma / alpha
            c_skip, c_out, c_in, c_noise = edm_coefficients(sigma_edm, self.sigma_data)
            x_edm = x / _bc(alpha, x)
            out = network(_bc(c_in, x) * x_edm, c_noise)
            x0 = _bc(c_skip, x) * x_edm + _bc(c_out, x) * out
            return convert(x0, x, alpha, sigma, source="x0", target=target)
        out = network(x, cond)
        if self.scale_by_sigma:
            out = out / _bc(sigma, x)
        return convert(out, x, alpha, sigma, source=self.output, target=target)


def as_parameterization(parameterization: str | Parameterization, model: nn.Module | None = None, **kwargs):
    """A :class:`Parameterization` from a name; the embedding type defaults to the model's own."""
    if isinstance(parameterization, Parameterization):
        return parameterization
    if "embedding_type" not in kwargs or kwargs["embedding_type"] is None:
        kwargs["embedding_type"] = getattr(model, "embedding_type", "fourier")
    return Parameterization(parameterization, **kwargs)


@dataclasses.dataclass(frozen=True)
class ScoreModel:
    """A Flax network bound to an SDE and a parameterization (all static, hashable).

    Attributes:
      model: the Linen module, called as ``model.apply({'params': params}, x, noise_cond, y, train=...)``.
      sde: the forward SDE whose ``alpha(t)``, ``sigma(t)`` interpret the output.
      parameterization: what the output means.
    """

    model: nn.Module
    sde: SDE
    parameterization: Parameterization = Parameterization()

    def predict(
        self,
        params: PyTree,
        x: Float[Array, " b *d"],
        t: Float[Array, " b"],
        *,
        target: str = "score",
        y: Array | None = None,
        train: bool = False,
        key: Array | None = None,
        alpha: Array | None = None,
        sigma: Array | None = None,
    ) -> Float[Array, " b *d"]:
        """The network's prediction of ``target`` at ``(x, t)``.

        Args:
          params: the network's ``params`` collection.
          x: noisy data.
          t: times ``(batch,)``; they set the noise conditioning.
          target: one of :data:`TARGETS`.
          y: class labels, for a class-conditional network.
          train: run the network in training mode (dropout, with ``key``).
          key: dropout key.
          alpha: overrides ``sde.alpha(t)`` (discrete schedules such as DDPM's ``sqrt(alphas_cumprod)``).
          sigma: overrides ``sde.sigma(t)``.
        """
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        alpha = self.sde.alpha(t) if alpha is None else alpha
        sigma = self.sde.sigma(t) if sigma is None else sigma
        p = self.parameterization
        cond = None if p.output == "edm" else noise_cond(t, self.sde, p.embedding_type)
        rngs = {"dropout": key} if (train and key is not None) else None

        def network(x_in, c):
            return self.model.apply({"params": params}, x_in, c, y, train=train, rngs=rngs)

        return p(network, x, alpha, sigma, cond, target)

    def __call__(self, params: PyTree, y, guidance_weight, x: Array, t: Array) -> Array:
        """The score; with ``guidance_weight``, classifier-free guidance (Ho & Salimans, 2022, eq. 6):
        ``(1 + w) s(x, t, y) - w s(x, t, null)``, the null label being ``model.num_classes``.

        Labels (and per-example weights) arrive wrapped in :class:`jaxdiff.PerExample`, so that per-example ODE
        solves split them with the batch."""
        y, guidance_weight = unwrap(y), unwrap(guidance_weight)
        score = self.predict(params, x, t, y=y)
        if guidance_weight is None:
            return score
        null = jnp.full(x.shape[:1], self.model.num_classes, jnp.int32)
        uncond = self.predict(params, x, t, y=null)
        return (1.0 + guidance_weight) * score - guidance_weight * uncond


def make_score_fn(
    model: nn.Module,
    params: PyTree,
    sde: SDE,
    *,
    parameterization: str | Parameterization = "eps",
    embedding_type: str | None = None,
    scale_by_sigma: bool = False,
    sigma_data: float = 0.5,
    y: Array | None = None,
    guidance_weight: float | Array | None = None,
) -> Partial:
    """Turns a network into the ``score_fn(x, t)`` of an SDE.

    Args:
      model: the Flax Linen score network.
      params: its ``params`` collection (traced: a new value needs no recompilation of a sampler).
      sde: the SDE the network was trained for.
      parameterization: ``'score'``, ``'eps'``, ``'x0'``, ``'v'``, ``'velocity'``, ``'edm'`` or a
        :class:`Parameterization`.
      embedding_type: noise conditioning, ``'fourier'`` (``log sigma``) or ``'positional'`` (``999 t``);
        defaults to ``model.embedding_type``.
      scale_by_sigma: score = output / sigma (with ``parameterization='score'``).
      sigma_data: EDM's data standard deviation.
      y: labels ``(batch,)`` for a class-conditional network.
      guidance_weight: classifier-free guidance weight ``w`` (needs ``y``).

    Returns:
      A :class:`jax.tree_util.Partial` ``score_fn(x, t)`` with ``t`` of shape ``(batch,)``.
    """
    p = as_parameterization(
        parameterization,
        model,
        embedding_type=embedding_type,
        scale_by_sigma=scale_by_sigma,
        sigma_data=sigma_data,
    )
    if guidance_weight is not None:
        if y is None or getattr(model, "num_classes", None) is None:
            raise ValueError("classifier-free guidance needs labels y and a class-conditional model")
        guidance_weight = jnp.asarray(guidance_weight, jnp.float32)
    return Partial(ScoreModel(model, sde, p), params, per_example(y), per_example(guidance_weight))
