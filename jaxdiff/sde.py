"""Forward SDEs of score-based generative modelling (Song et al., ICLR 2021).

Every SDE here is linear with a Gaussian perturbation kernel (eq. 29 of the paper's appendix):

    x_t = alpha(t) * x_0 + sigma(t) * eps,        eps ~ N(0, I),

driven by ``dx = f(t) x dt + g(t) dW``. VP, sub-VP, VE and the linear path of flow matching (:class:`RectifiedFlow`,
``alpha = 1 - t``, ``sigma = t``) differ only in ``alpha``, ``sigma``, ``f`` and ``g``; everything downstream
(samplers, likelihood, losses) is written once against this interface, through the probability-flow drift and the
data prediction the SDE computes from a score function (:meth:`SDE.probability_flow_drift`,
:meth:`SDE.data_prediction`).

The SDE objects are frozen dataclasses registered as *static* pytrees: they have no array leaves, their
hyper-parameters are hashable, and they can be passed straight into ``jax.jit``-compiled functions (a new
hyper-parameter value means a new compilation, as it should). Time ``t`` is an array of shape ``(batch,)``
(or a scalar) and ``x`` any shape ``(batch, ...)``; per-example quantities broadcast against ``x``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "CosineVPSDE", "RectifiedFlow", "ReverseSDE", "batch_broadcast"]


def batch_broadcast(a: Array, x: Array) -> Array:
    """Reshapes a per-example array ``a`` of shape ``(batch,)`` (or a scalar) to broadcast against ``x``."""
    a = jnp.asarray(a)
    return jnp.reshape(a, a.shape + (1,) * (jnp.ndim(x) - a.ndim))


def _sum_except_batch(x: Array) -> Array:
    return jnp.sum(jnp.reshape(x, (x.shape[0], -1)), axis=-1)


def _check_positive(name: str, value: float, obj=None) -> None:
    """A finite positive Python or NumPy number; stored on ``obj`` as a Python ``float`` (hashable, comparable)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    if obj is not None:
        object.__setattr__(obj, name, float(value))


def _check_count(name: str, value: int, obj) -> None:
    """A positive Python or NumPy integer, stored on ``obj`` as an ``int``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    object.__setattr__(obj, name, int(value))


class SDE(abc.ABC):
    """A linear SDE ``dx = f(t) x dt + g(t) dW`` on ``[0, T]`` with a Gaussian perturbation kernel.

    Subclasses define ``alpha``, ``sigma``, ``sde``, ``prior_sampling``, ``prior_logp``, ``log_snr`` and
    ``t_from_log_snr``. Everything else derives from them.
    """

    N: int
    T: float = 1.0

    # -- the perturbation kernel p_{0t}(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I) --------------------------
    @abc.abstractmethod
    def alpha(self, t: Array) -> Array:
        """Mean coefficient ``alpha(t)`` of the perturbation kernel."""

    @abc.abstractmethod
    def sigma(self, t: Array) -> Array:
        """Standard deviation ``sigma(t)`` of the perturbation kernel."""

    @abc.abstractmethod
    def log_snr(self, t: Array) -> Array:
        """Log signal-to-noise ratio ``lambda(t) = log(alpha(t)^2 / sigma(t)^2)``, decreasing in ``t``."""

    def log_snr_at_T(self) -> float:
        """``log_snr(T)`` as a Python float, evaluated now even under an outer trace; ``-inf`` where
        ``alpha(T) = 0`` (the rectified-flow path), where methods that start from a finite log-SNR do not apply."""
        with jax.ensure_compile_time_eval():
            return float(self.log_snr(jnp.float32(self.T)))

    @abc.abstractmethod
    def t_from_log_snr(self, log_snr: Array) -> Array:
        """Inverse of :meth:`log_snr`."""

    @abc.abstractmethod
    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        """Drift ``f(x, t)`` (shape of ``x``) and diffusion ``g(t)`` (shape of ``t``) of the forward SDE."""

    @abc.abstractmethod
    def prior_sampling(self, key: Array, shape: tuple[int, ...]) -> Array:
        """Samples the prior ``p_T`` that the reverse process starts from."""

    @abc.abstractmethod
    def prior_logp(self, z: Array) -> Array:
        """Log-density of the prior, per example: shape ``(batch,)``."""

    def marginal_prob(self, x: Array, t: Array) -> tuple[Array, Array]:
        """Mean ``alpha(t) x_0`` and std ``sigma(t)`` of the perturbation kernel ``p_{0t}(x_t | x_0)``."""
        return batch_broadcast(self.alpha(t), x) * x, self.sigma(t)

    @property
    def prior_std(self) -> float:
        """Standard deviation of the (isotropic Gaussian) prior."""
        return 1.0

    # -- transitions between two times, used by the samplers ---------------------------------------------
    def transition(self, t: Array, s: Array) -> tuple[Array, Array]:
        """Forward transition ``p(x_t | x_s) = N(a x_s, v I)`` for ``s < t``; returns ``(a, v)``.

        For any linear SDE the increments are independent, so ``sigma(t)^2 = a^2 sigma(s)^2 + v``.
        """
        a = self.alpha(t) / self.alpha(s)
        v = jnp.maximum(self.sigma(t) ** 2 - a**2 * self.sigma(s) ** 2, 0.0)
        return a, v

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        """One step of the forward process on the ``N``-point grid: ``x_{i+1} = x_i + f + G z``.

        The default is Euler--Maruyama with ``dt = T / N``; VP and VE override it with the DDPM and SMLD
        discretisations (eqs. 9 and 7 of the paper).
        """
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * jnp.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (eq. 6) or, with ``probability_flow=True``, the probability-flow ODE (eq. 13)."""
        return ReverseSDE(self, score_fn, probability_flow)

    # -- the probability-flow ODE and the data prediction, from a score function ---------------------------
    def probability_flow_drift(self, score_fn: ScoreFn, x: Array, t: Array) -> Array:
        """The probability-flow drift ``f(x, t) - g(t)^2 score(x, t) / 2`` (eq. 13); ``t`` of shape ``(batch,)``.

        One evaluation of ``score_fn``. An SDE whose ``f`` and ``g`` are infinite somewhere the drift is not
        (:class:`RectifiedFlow` at ``t = 1``) overrides this with a finite form.
        """
        drift, diffusion = self.sde(x, t)
        return drift - 0.5 * batch_broadcast(diffusion**2, x) * score_fn(x, t)

    def data_prediction(self, score_fn: ScoreFn, x: Array, t: Array) -> tuple[Array, Array]:
        """Tweedie's ``E[x_0 | x_t] = (x_t + sigma(t)^2 score) / alpha(t)`` and the score; one evaluation.

        ``t`` is a scalar or of shape ``(batch,)``. Returns ``(x0, score)``.
        """
        tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        score = score_fn(x, tb)
        alpha, sigma = batch_broadcast(self.alpha(tb), x), batch_broadcast(self.sigma(tb), x)
        return (x + sigma**2 * score) / alpha, score

    def _timestep(self, t: Array) -> Array:
        # As in the reference code: the grid index is the floor of t (N - 1) / T.
        return jnp.clip(jnp.floor(t * (self.N - 1) / self.T).astype(jnp.int32), 0, self.N - 1)


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
    """Reverse-time SDE ``dx = [f - g^2 score] dt + g dW_bar`` or its probability-flow ODE."""

    forward: SDE
    score_fn: ScoreFn
    probability_flow: bool = False

    @property
    def N(self) -> int:
        return self.forward.N

    @property
    def T(self) -> float:
        return self.forward.T

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        drift, diffusion = self.forward.sde(x, t)
        if self.probability_flow:
            return self.forward.probability_flow_drift(self.score_fn, x, t), jnp.zeros_like(diffusion)
        g2 = batch_broadcast(diffusion**2, x)
        scale = 0.5 if self.probability_flow else 1.0
        drift = drift - g2 * self.score_fn(x, t) * scale
        diffusion = jnp.zeros_like(diffusion) if self.probability_flow else diffusion
        return drift, diffusion

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        f, G = self.forward.discretize(x, t)
        scale = 0.5 if self.probability_flow else 1.0
        rev_f = f - batch_broadcast(G**2, x) * self.score_fn(x, t) * scale
        rev_G = jnp.zeros_like(G) if self.probability_flow else G
        return rev_f, rev_G


# ----------------------------------------------------------------------------------------------------------
# Variance preserving (DDPM) and sub-VP
# ----------------------------------------------------------------------------------------------------------
class _LinearBeta(SDE):
    """Shared maths of VP and sub-VP: ``beta(t) = beta_min + t (beta_max - beta_min)``."""

    beta_min: float
    beta_max: float

    def __post_init__(self):
        _check_positive("beta_min", self.beta_min, self)
        _check_positive("beta_max", self.beta_max, self)
        if self.beta_min > self.beta_max:
            raise ValueError(
                f"beta_min must not exceed beta_max, got beta_min={self.beta_min}, "
                f"beta_max={self.beta_max}"
            )
        _check_count("N", self.N, self)
        _check_positive("T", self.T, self)

    def beta(self, t: Array) -> Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: Array) -> Array:
        """``B(t) = int_0^t beta(s) ds``, so that ``alpha(t) = exp(-B(t) / 2)``."""
        return 0.5 * t**2 * (self.beta_max - self.beta_min) + t * self.beta_min

    def _t_from_integrated_beta(self, c: Array) -> Array:
        # Solves 0.5 (b1 - b0) t^2 + b0 t = c for t >= 0 in the cancellation-free form.
        b0, db = self.beta_min, self.beta_max - self.beta_min
        return 2.0 * c / (b0 + jnp.sqrt(b0**2 + 2.0 * db * c))

    def alpha(self, t: Array) -> Array:
        return jnp.exp(-0.5 * self.integrated_beta(t))

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        beta_t = self.beta(t)
        return -0.5 * batch_broadcast(beta_t, x) * x, jnp.sqrt(beta_t * self._diffusion_factor(t))

    def _diffusion_factor(self, t: Array) -> Array:
        return jnp.ones_like(t)

    def prior_sampling(self, key: Array, shape: tuple[int, ...]) -> Array:
        return jax.random.normal(key, shape)

    def prior_logp(self, z: Array) -> Array:
        d = math.prod(z.shape[1:])
        return -0.5 * d * jnp.log(2 * jnp.pi) - 0.5 * _sum_except_batch(z**2)


@dataclasses.dataclass(frozen=True)
class VPSDE(_LinearBeta):
    """Variance-preserving SDE, the continuous limit of DDPM (eq. 11).

    ``dx = -beta(t) x / 2 dt + sqrt(beta(t)) dW``; ``alpha(t)^2 + sigma(t)^2 = 1``.

    Args:
      beta_min: ``beta(0)``.
      beta_max: ``beta(1)``.
      N: number of discretisation steps (DDPM's ``T``).

    >>> sde = VPSDE()
    >>> mean, std = sde.marginal_prob(jnp.ones((2, 3)), jnp.array([0.5, 1.0]))
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000
    T: float = 1.0

    def sigma(self, t: Array) -> Array:
        return jnp.sqrt(-jnp.expm1(-self.integrated_beta(t)))

    def log_snr(self, t: Array) -> Array:
        # log(alpha^2 / (1 - alpha^2)) = -log(expm1(B(t)))
        return -jnp.log(jnp.expm1(self.integrated_beta(t)))

    def t_from_log_snr(self, log_snr: Array) -> Array:
        # alpha^2 = sigmoid(lambda)  =>  B(t) = softplus(-lambda)
        return self._t_from_integrated_beta(jax.nn.softplus(-log_snr))

    @property
    def discrete_betas(self) -> Array:
        return jnp.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        """DDPM discretisation: ``x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z``."""
        beta = self.discrete_betas[self._timestep(t)]
        f = batch_broadcast(jnp.sqrt(1.0 - beta), x) * x - x
        return f, jnp.sqrt(beta)


@dataclasses.dataclass(frozen=True)
class SubVPSDE(_LinearBeta):
    """Sub-VP SDE (eq. 17): ``g(t)^2 = beta(t) (1 - exp(-2 B(t)))``, so ``sigma(t) = 1 - alpha(t)^2``.

    Its marginal variance is bounded by the VP SDE's at every ``t``; it gives better likelihoods.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000
    T: float = 1.0

    def _diffusion_factor(self, t: Array) -> Array:
        return -jnp.expm1(-2.0 * self.integrated_beta(t))

    def sigma(self, t: Array) -> Array:
        return -jnp.expm1(-self.integrated_beta(t))

    def log_snr(self, t: Array) -> Array:
        b = self.integrated_beta(t)
        return -b - 2.0 * jnp.log(-jnp.expm1(-b))

    def t_from_log_snr(self, log_snr: Array) -> Array:
        # alpha / (1 - alpha^2) = r = exp(lambda / 2)  =>  -log(alpha) = asinh(1 / (2 r)).
        return self._t_from_integrated_beta(2.0 * jnp.arcsinh(0.5 * jnp.exp(-0.5 * log_snr)))


@dataclasses.dataclass(frozen=True)
class CosineVPSDE(SDE):
    """VP SDE with the cosine schedule of Nichol & Dhariwal (2021).

    ``alpha(t) = cos(pi/2 (t + s) / (1 + s)) / cos(pi/2 s / (1 + s))``, truncated at ``T = t_max`` where
    ``beta(t) = -2 d log alpha / dt`` would blow up.
    """

    s: float = 0.008
    N: int = 1000
    T: float = 0.9946  # alpha(T)^2 ~ 1e-5: the prior N(0, I) is then exact to that order.

    def __post_init__(self):
        _check_positive("s", self.s, self)
        _check_count("N", self.N, self)
        _check_positive("T", self.T, self)
        if not 0.0 < self.T < 1.0:
            raise ValueError(
                f"CosineVPSDE needs 0 < T < 1 (beta blows up at t = 1), got T={self.T}"
            )

    def _phase(self, t: Array) -> Array:
        return 0.5 * jnp.pi * (t + self.s) / (1.0 + self.s)

    def _log_alpha(self, t: Array) -> Array:
        return jnp.log(jnp.cos(self._phase(t))) - math.log(
            math.cos(0.5 * math.pi * self.s / (1 + self.s))
        )

    def alpha(self, t: Array) -> Array:
        return jnp.exp(self._log_alpha(t))

    def sigma(self, t: Array) -> Array:
        return jnp.sqrt(-jnp.expm1(2.0 * self._log_alpha(t)))

    def beta(self, t: Array) -> Array:
        return jnp.pi / (1.0 + self.s) * jnp.tan(self._phase(t))

    def log_snr(self, t: Array) -> Array:
        return -jnp.log(jnp.expm1(-2.0 * self._log_alpha(t)))

    def t_from_log_snr(self, log_snr: Array) -> Array:
        log_alpha = -0.5 * jax.nn.softplus(-log_snr)
        c0 = math.log(math.cos(0.5 * math.pi * self.s / (1 + self.s)))
        phase = jnp.arccos(jnp.exp(log_alpha + c0))
        return phase * 2.0 * (1.0 + self.s) / jnp.pi - self.s

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        beta_t = self.beta(t)
        return -0.5 * batch_broadcast(beta_t, x) * x, jnp.sqrt(beta_t)

    def prior_sampling(self, key: Array, shape: tuple[int, ...]) -> Array:
        return jax.random.normal(key, shape)

    def prior_logp(self, z: Array) -> Array:
        d = math.prod(z.shape[1:])
        return -0.5 * d * jnp.log(2 * jnp.pi) - 0.5 * _sum_except_batch(z**2)


# ----------------------------------------------------------------------------------------------------------
# Variance exploding (NCSN / SMLD)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
    """Variance-exploding SDE, the continuous limit of NCSN/SMLD (eq. 30).

    ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, ``dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dW``
    and ``alpha(t) = 1``. The marginal ``p_t`` is the data convolved with ``N(0, sigma(t)^2 I)``: exactly the
    law of the SDE started from the data smoothed at ``sigma_min``, as in the paper.

    Args:
      sigma_min: smallest noise level.
      sigma_max: largest noise level; the prior is ``N(0, sigma_max^2 I)``.
      N: number of noise levels of the SMLD discretisation.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    N: int = 1000
    T: float = 1.0

    def __post_init__(self):
        _check_positive("sigma_min", self.sigma_min, self)
        _check_positive("sigma_max", self.sigma_max, self)
        if self.sigma_min >= self.sigma_max:
            raise ValueError(
                f"sigma_min must be below sigma_max, got sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}"
            )
        _check_count("N", self.N, self)
        _check_positive("T", self.T, self)

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t: Array) -> Array:
        return jnp.ones_like(jnp.asarray(t, dtype=jnp.result_type(float)))

    def sigma(self, t: Array) -> Array:
        return self.sigma_min * jnp.exp(t / self.T * self._log_ratio)

    def log_snr(self, t: Array) -> Array:
        return -2.0 * (math.log(self.sigma_min) + t / self.T * self._log_ratio)

    def t_from_log_snr(self, log_snr: Array) -> Array:
        return (-0.5 * log_snr - math.log(self.sigma_min)) / self._log_ratio * self.T

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        diffusion = self.sigma(t) * math.sqrt(2.0 * self._log_ratio / self.T)
        return jnp.zeros_like(x), diffusion

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def prior_sampling(self, key: Array, shape: tuple[int, ...]) -> Array:
        return jax.random.normal(key, shape) * self.sigma_max

    def prior_logp(self, z: Array) -> Array:
        d = math.prod(z.shape[1:])
        return (
            -0.5 * d * jnp.log(2 * jnp.pi * self.sigma_max**2)
            - 0.5 * _sum_except_batch(z**2) / self.sigma_max**2
        )

    @property
    def discrete_sigmas(self) -> Array:
        return jnp.exp(jnp.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N))

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        """SMLD discretisation: ``x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z``."""
        i = self._timestep(t)
        sigmas = self.discrete_sigmas
        adjacent = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
        return jnp.zeros_like(x), jnp.sqrt(sigmas[i] ** 2 - adjacent**2)


# ----------------------------------------------------------------------------------------------------------
# Rectified flow / conditional flow matching with the linear path
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RectifiedFlow(SDE):
    """The linear path of rectified flow and flow matching: ``x_t = (1 - t) x_0 + t eps`` on ``[0, 1]``.

    ``alpha(t) = 1 - t`` and ``sigma(t) = t`` (Liu et al. 2023; Lipman et al. 2023; the convention of Esser et al.
    2024, Stable Diffusion 3: ``t = 0`` is data, ``t = 1`` noise). The prior ``N(0, I)`` at ``T = 1`` is exact:
    ``alpha(1) = 0``. The linear SDE with this kernel has ``f = alpha' / alpha = -1 / (1 - t)`` and
    ``g^2 = d sigma^2 / dt - 2 f sigma^2 = 2 t / (1 - t)``, both infinite at ``t = 1``, while the velocity of the
    probability-flow ODE (eq. 13 of Song et al. 2021)

        dx/dt = E[eps - x_0 | x_t] = -(x + t score(x, t)) / (1 - t)

    is finite there: ``x + t score`` vanishes at ``t = 1`` (``score(x, 1) = -x``), and by l'Hopital's rule the
    velocity at ``t = 1`` is ``d/dt [x + t score(x, t)]``, which :meth:`probability_flow_drift` computes with one
    forward-mode derivative in ``t`` (a ``jax.jvp``) wherever ``t = 1``. The ODE sampler, the likelihood and the
    few-step samplers go through it (or :meth:`data_prediction`), so they start exactly at ``T = 1``.

    The reverse-time SDE has infinite drift and diffusion at ``t = 1``; samplers built on it (Euler--Maruyama,
    reverse diffusion, ancestral) do not apply from ``T = 1``.

    Seeds' convention (Liu et al. 2023, some flow-matching code): ``t' = 1 - t`` (``t' = 0`` noise) and velocity
    ``v' = x_0 - eps = -v``.

    Args:
      N: number of steps of the Euler--Maruyama discretisation (:meth:`discretize`).

    >>> sde = RectifiedFlow()
    >>> mean, std = sde.marginal_prob(jnp.ones((2, 3)), jnp.array([0.25, 1.0]))
    >>> std.tolist(), mean[1].tolist()
    ([0.25, 1.0], [0.0, 0.0, 0.0])
    """

    N: int = 1000

    def __post_init__(self):
        _check_count("N", self.N, self)

    def alpha(self, t: Array) -> Array:
        return 1.0 - jnp.asarray(t, jnp.result_type(float))

    def sigma(self, t: Array) -> Array:
        return jnp.asarray(t, jnp.result_type(float))

    def log_snr(self, t: Array) -> Array:
        # 2 log((1 - t) / t): +inf at t = 0, -inf at t = 1.
        t = jnp.asarray(t, jnp.result_type(float))
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def t_from_log_snr(self, log_snr: Array) -> Array:
        # (1 - t) / t = exp(lambda / 2)  =>  t = sigmoid(-lambda / 2); exact at lambda = +-inf.
        return jax.nn.sigmoid(-0.5 * jnp.asarray(log_snr, jnp.result_type(float)))

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        """``f(x, t) = -x / (1 - t)``, ``g(t) = sqrt(2 t / (1 - t))``; infinite at ``t = 1``."""
        one_minus = self.alpha(t)
        return -x / batch_broadcast(one_minus, x), jnp.sqrt(2.0 * self.sigma(t) / one_minus)

    def prior_sampling(self, key: Array, shape: tuple[int, ...]) -> Array:
        return jax.random.normal(key, shape)

    def prior_logp(self, z: Array) -> Array:
        d = math.prod(z.shape[1:])
        return -0.5 * d * jnp.log(2 * jnp.pi) - 0.5 * _sum_except_batch(z**2)

    def _velocity_and_score(self, score_fn: ScoreFn, x: Array, t: Array) -> tuple[Array, Array]:
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        at_end = t >= 1.0
        one_minus = batch_broadcast(jnp.where(at_end, 1.0, 1.0 - t), x)  # 1 where t = 1: no 0/0, even in grads

        def numerator(u):
            score = score_fn(x, u)
            return x + batch_broadcast(u, x) * score, score

        def interior(_):
            num, score = numerator(t)
            return -num / one_minus, score

        def endpoint(_):
            # v(x, 1) = lim -(x + t s) / (1 - t) = d/dt [x + t s(x, t)] at t = 1 (l'Hopital; x + s(x, 1) = 0).
            (num, score), (dnum, _) = jax.jvp(numerator, (t,), (jnp.ones_like(t),))
            return jnp.where(batch_broadcast(at_end, x), dnum, -num / one_minus), score

        # A branch taken only where some t = 1 (the first step of the samplers), so the derivative costs nothing
        # elsewhere: measured with a 3 x 512 MLP, an evaluation of the flow costs as much as one of the VP
        # probability-flow drift, shared or per-example steps (under a vmap with per-example t, JAX may lower the
        # branch to a select that evaluates both).
        return jax.lax.cond(jnp.any(at_end), endpoint, interior, None)

    def probability_flow_drift(self, score_fn: ScoreFn, x: Array, t: Array) -> Array:
        """The velocity ``dx/dt = E[eps - x_0 | x_t] = -(x + t score) / (1 - t)``, finite at ``t = 1``.

        This is ``f - g^2 score / 2`` with ``f = -x / (1 - t)``, ``g^2 / 2 = t / (1 - t)``, written as one
        fraction; in general form ``(alpha' / alpha) x - sigma^2 (d/dt log(sigma / alpha)) score``. At ``t = 1``
        it is the limit ``d/dt [x + t score(x, t)]``: one ``jax.jvp`` of ``score_fn`` in ``t`` (exact for any
        score with ``score(x, 1) = -x``, which the exact score and every network converted by
        :mod:`jaxdiff.parameterization` from a velocity or ``x_0`` output satisfy).
        """
        return self._velocity_and_score(score_fn, x, t)[0]

    def data_prediction(self, score_fn: ScoreFn, x: Array, t: Array) -> tuple[Array, Array]:
        """``E[x_0 | x_t] = x - t v(x, t)`` (Tweedie's formula, finite at ``t = 1``) and the score."""
        tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        v, score = self._velocity_and_score(score_fn, x, tb)
        return x - batch_broadcast(tb, x) * v, score


for _cls in (VPSDE, SubVPSDE, VESDE, CosineVPSDE, RectifiedFlow):
    jax.tree_util.register_static(_cls)
