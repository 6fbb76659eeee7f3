"""Controllable generation: classifier guidance, classifier-free guidance, inpainting and colorization.

Song et al., ICLR 2021, sec. 5 and appendix I. Given the unconditional score ``s(x, t) = grad log p_t(x)``:

* **Classifier guidance** (eq. 14; Dhariwal & Nichol 2021): the conditional score is
  ``grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x)``, so a noise-conditional classifier
  ``p_t(y | x)`` turns an unconditional model into a conditional one. A ``scale`` other than 1 samples
  ``p_t(x) p_t(y | x)^scale`` (sharper for ``scale > 1``). Guidance sees the classifier only as its
  log-probability function ``log_prob_y_fn(x, t)``: the exact one of a Gaussian mixture
  (:func:`mixture_classifier_log_probs`) or a trained network's; the network, its loss on perturbed data and its
  training live in :mod:`jaxdiff.models` (:class:`jaxdiff.models.NoiseConditionalClassifier`,
  :func:`jaxdiff.models.make_classifier_log_prob_fn`; their old names here still resolve).
* **Classifier-free guidance** (Ho & Salimans 2022): ``(1 + w) s(x, t, y) - w s(x, t)``; for networks see
  :func:`jaxdiff.parameterization.make_score_fn` (``guidance_weight=``), for any two score functions
  :func:`classifier_free_guided_score_fn`.
* **Inpainting** (appendix I.2): the known coordinates ``x_k`` are replaced after every step by a draw of
  the forward-perturbed known data ``alpha(t) x_k + sigma(t) z`` at the current time, while the unknown
  ones follow the reverse process (:func:`inpaint`). The output keeps the known coordinates exactly.
* **Colorization** (appendix I.3): the same mechanism after an orthogonal change of the channel basis
  in which the grayscale image is one coordinate (:data:`DECOUPLE`, :func:`colorize`).

The constrained time loop (:func:`constrained_sample`) is written once over a :class:`Constraint` and takes
the predictor and corrector functions of :mod:`jaxdiff.samplers.pc`, or a fixed-step probability-flow ODE
(Euler or Heun). Randomness is per example, as in every sampler: example ``i`` draws from ``fold_in(key, i)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from jaxtyping import Array, Float

from jaxdiff.oracle import GaussianMixture
from jaxdiff.per_example import per_example, unwrap
from jaxdiff.samplers import _common as C
from jaxdiff.samplers.ode import probability_flow_drift
from jaxdiff.samplers.pc import CORRECTORS, PREDICTORS, tweedie_denoise
from jaxdiff.sde import SDE

__all__ = [
    "classifier_guided_score_fn",
    "classifier_free_guided_score_fn",
    "mixture_classifier_log_probs",
    "Constraint",
    "constrained_sample",
    "inpaint",
    "DECOUPLE",
    "grayscale",
    "colorize",
    "make_mask",
]

ScoreFn = Callable[[Array, Array], Array]

# The noise-conditional classifier is a network: it lives in jaxdiff.models. Its names still resolve here.
_MOVED_TO_MODELS = (
    "NoiseConditionalClassifier",
    "make_classifier_apply",
    "make_classifier_log_prob_fn",
    "noise_conditional_classifier_loss",
    "train_classifier",
)


def __getattr__(name):
    if name in _MOVED_TO_MODELS:
        from jaxdiff import models

        return getattr(models, name)
    raise AttributeError(f"module 'jaxdiff.guidance' has no attribute {name!r}")


# ==========================================================================================================
# Classifier guidance
# ==========================================================================================================
def _concrete(a) -> np.ndarray | None:
    """The value of ``a`` if it is known now (not a tracer inside ``jax.jit``), else ``None``."""
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_log_probs_and_labels(log_probs_shape, y, x_shape) -> int:
    """Checks ``log_prob_y_fn``'s output shape and the labels against the batch; returns the number of classes.

    Shapes are static, so they are checked at every trace; label values whenever they are concrete (a call
    outside ``jax.jit``, or the abstract check of a sampler's entry point).
    """
    batch = x_shape[0]
    if len(log_probs_shape) != 2 or log_probs_shape[0] != batch:
        raise ValueError(
            f"log_prob_y_fn returned shape {tuple(log_probs_shape)} for x of shape {tuple(x_shape)}; valid: "
            f"(batch, num_classes) = ({batch}, num_classes) log-probabilities"
        )
    num_classes = log_probs_shape[1]
    if jnp.ndim(y) == 1 and jnp.shape(y)[0] != batch:
        raise ValueError(
            f"labels y of shape {jnp.shape(y)} for a batch of {batch} examples; valid: one label, or one per "
            f"example, shape ({batch},)"
        )
    values = _concrete(y)
    if values is not None:
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.size:
            raise ValueError(
                f"label y={int(bad.flat[0])} is not a class of log_prob_y_fn, which has {num_classes} classes; "
                f"valid: 0 <= y < {num_classes}"
            )
    return num_classes


def _classifier_guided(score_fn, log_prob_y_fn, y, scale, x, t):
    y = unwrap(y)
    num_classes = _check_log_probs_and_labels(jax.eval_shape(log_prob_y_fn, x, t).shape, y, x.shape)
    y = jnp.broadcast_to(y, x.shape[:1])
    # Labels only known inside a jitted sampler cannot be refused: an example with a label outside
    # [0, num_classes) gets a NaN score, so it comes out NaN and counted in info["nonfinite"].
    valid = (y >= 0) & (y < num_classes)
    index = jnp.clip(y, 0, num_classes - 1)

    def log_p_y(x):  # summed over the batch: each example's gradient is its own
        return jnp.sum(jnp.take_along_axis(log_prob_y_fn(x, t), index[:, None], axis=-1))

    grad = jax.grad(log_p_y)(x)
    grad = jnp.where(jnp.reshape(valid, valid.shape + (1,) * (x.ndim - 1)), grad, jnp.nan)
    return score_fn(x, t) + scale * grad.astype(x.dtype)


def classifier_guided_score_fn(
    score_fn: ScoreFn, log_prob_y_fn: Callable[[Array, Array], Array], y, scale: float = 1.0
) -> Partial:
    """The score of ``p_t(x | y)``: ``s(x, t) + scale * grad_x log p_t(y | x)`` (eq. 14 of Song et al. 2021).

    Args:
      score_fn: the unconditional ``score_fn(x, t)``.
      log_prob_y_fn: ``log_prob_y_fn(x, t) -> (batch, num_classes)`` log-probabilities of a noise-conditional
        classifier ``p_t(y | x)``: :func:`mixture_classifier_log_probs`, or a trained network's
        (:func:`jaxdiff.models.make_classifier_log_prob_fn`).
      y: the target class, an integer or integer labels of shape ``(batch,)``, each in ``[0, num_classes)``.
      scale: guidance scale; 1 samples ``p(x | y)``, larger values sharpen towards the class.

    Returns:
      A :class:`jax.tree_util.Partial` ``score_fn(x, t)`` (its arrays are traced by the samplers). A label
      outside ``[0, num_classes)`` or labels of another batch size are refused when the function is traced
      with concrete labels (by :func:`jaxdiff.sample` before compiling, or called directly); labels known only
      inside ``jax.jit`` that are out of range give that example a NaN score.

    >>> import jaxdiff
    >>> from jaxdiff import GaussianMixture, VPSDE
    >>> sde, gm = VPSDE(), GaussianMixture.grid()
    >>> guided = classifier_guided_score_fn(gm.score_fn(sde), mixture_classifier_log_probs(gm, sde), y=2)
    >>> x, info = jaxdiff.sample(jax.random.key(0), guided, sde, (16, 2), method="pc", steps=100)
    """
    y_array = jnp.asarray(y)
    if not jnp.issubdtype(y_array.dtype, jnp.integer) or y_array.ndim > 1:
        raise ValueError(
            f"y must be an integer class label or integer labels of shape (batch,), got {y!r} "
            f"(dtype {y_array.dtype}, shape {y_array.shape})"
        )
    values = _concrete(y_array)
    if values is not None and np.any(values < 0):
        raise ValueError(f"label y={int(values[values < 0].flat[0])} is not a class; valid: 0 <= y < num_classes")
    scale_value = _concrete(jnp.asarray(scale))
    if scale_value is not None and (scale_value.ndim != 0 or not np.isfinite(scale_value)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return Partial(
        _classifier_guided,
        C.as_partial(score_fn),
        C.as_partial(log_prob_y_fn),
        per_example(y_array.astype(jnp.int32)),
        jnp.asarray(scale, jnp.float32),
    )


def _classifier_free(cond_score_fn, uncond_score_fn, w, x, t):
    return (1.0 + w) * cond_score_fn(x, t) - w * uncond_score_fn(x, t)


def classifier_free_guided_score_fn(cond_score_fn: ScoreFn, uncond_score_fn: ScoreFn, w: float) -> Partial:
    """Classifier-free guidance ``(1 + w) s(x, t, y) - w s(x, t)`` (Ho & Salimans 2022) of two score functions.

    ``w = 0`` is the conditional score; ``w > 0`` samples (approximately) ``p(x | y)^(1+w) / p(x)^w``, sharper
    than ``p(x | y)``. For a class-conditional network use ``make_score_fn(..., y=, guidance_weight=w)``.
    """
    return Partial(
        _classifier_free, C.as_partial(cond_score_fn), C.as_partial(uncond_score_fn), jnp.asarray(w, jnp.float32)
    )


def _mixture_classifier(mixture: GaussianMixture, sde: SDE, x, t):
    # One single-component mixture per component, with its weight: marginal_log_prob = log w_k + log N_k,t(x).
    components = jax.tree.map(lambda a: a[:, None], mixture)
    log_joint = jax.vmap(lambda comp: comp.marginal_log_prob(x, t, sde), out_axes=-1)(components)
    return jax.nn.log_softmax(log_joint, axis=-1)


def mixture_classifier_log_probs(mixture: GaussianMixture, sde: SDE) -> Partial:
    """The exact noise-conditional classifier of a Gaussian mixture: ``log p_t(y = k | x)``, ``(batch, K)``.

    ``p_t(k | x) = w_k N(x; alpha m_k, alpha^2 C_k + sigma^2 I) / p_t(x)``, the responsibilities at time ``t``;
    with it, :func:`classifier_guided_score_fn` at ``scale=1`` is the exact score of component ``k``.
    """
    return Partial(_mixture_classifier, mixture, sde)


# ==========================================================================================================
# Constrained sampling: inpainting and colorization (appendix I.2, I.3)
# ==========================================================================================================
class Constraint(NamedTuple):
    """Known coordinates of the data in an orthogonal channel basis.

    With ``M`` the ``(C, C)`` orthogonal ``transform`` (``None`` for the identity), the sample is viewed as
    ``u = x @ M`` (channels last); ``mask == 1`` marks the coordinates of ``u`` that are known, with values
    ``known`` (also in the ``u`` basis). Since ``M`` is orthogonal and every SDE here is isotropic, the
    forward process commutes with it: ``u_t = alpha(t) u_0 + sigma(t) z'`` with ``z' = z @ M ~ N(0, I)``.
    """

    known: Array  # (batch, *event), in the transformed basis
    mask: Array  # broadcastable to known; 1 = known
    transform: Array | None = None  # (C, C) orthogonal, or None

    def to_basis(self, x: Array) -> Array:
        return x if self.transform is None else x @ self.transform

    def from_basis(self, u: Array) -> Array:
        return u if self.transform is None else u @ self.transform.T

    def project(self, sde: SDE, x: Array, t, z: Array) -> Array:
        """Replaces the known part by the forward-perturbed known data ``alpha(t) known + sigma(t) z``."""
        known_t = sde.alpha(t) * self.known + sde.sigma(t) * z
        return self.from_basis(jnp.where(self.mask > 0, known_t, self.to_basis(x)))

    def finalize(self, x: Array) -> Array:
        """Puts the known data back exactly (bitwise, for the identity basis)."""
        return self.from_basis(jnp.where(self.mask > 0, self.known, self.to_basis(x)))


# Stream tags of the projection noise inside a step (the predictor and corrector use 0 and 1).
_PROJECT_AFTER_CORRECTOR, _PROJECT_AFTER_PREDICTOR = 2, 3
_INITIAL_STREAM = 2  # tag on the example key (C.PRIOR_STREAM = 0, C.STEP_STREAM = 1)


def _constrained_loop(key, score_fn, sde, constraint, steps, eps, denoise, step):
    """The time loop shared by every constrained sampler.

    ``step(x, t, s, skeys, project) -> (x, nfe)`` moves ``x`` from ``t`` to ``s``; it calls
    ``project(x, time, tag)`` after each of its sub-steps.
    """
    shape = constraint.known.shape
    keys = C.example_keys(key, shape[0])
    ts = jnp.linspace(sde.T, eps, steps + 1, dtype=jnp.float32)

    def project(x, time, skeys, tag):
        return constraint.project(sde, x, time, C.per_example_normal(skeys, tag, shape[1:]))

    x = C.prior_sample(keys, sde, shape[1:])
    x = project(x, ts[0], keys, _INITIAL_STREAM)  # a stream of the example key apart from prior and steps

    def body(x, i):
        skeys = C.step_keys(keys, i)
        x = step(x, ts[i], ts[i + 1], skeys, partial(project, skeys=skeys))
        return x, None

    x, _ = jax.lax.scan(body, x, jnp.arange(steps))
    if denoise:
        x = tweedie_denoise(score_fn, sde, x, ts[-1])
    return constraint.finalize(x)


@partial(jax.jit, static_argnames=("sde", "steps", "predictor", "corrector", "corrector_steps", "denoise"))
def _constrained_pc(key, score_fn, sde, constraint, steps, predictor, corrector, corrector_steps, snr, eps, denoise):
    predict, correct = PREDICTORS[predictor], CORRECTORS[corrector]
    event = constraint.known.shape[1:]

    def step(x, t, s, skeys, project):
        if correct is not None:
            ckeys = jax.vmap(jax.random.fold_in, (0, None))(skeys, 1)
            x, _ = correct(sde, score_fn, x, t, s, ckeys, snr, corrector_steps)
            x = project(x, t, tag=_PROJECT_AFTER_CORRECTOR)
        if predict is not None:
            x, _ = predict(sde, score_fn, x, t, s, C.per_example_normal(skeys, 0, event))
            x = project(x, s, tag=_PROJECT_AFTER_PREDICTOR)
        return x

    x = _constrained_loop(key, score_fn, sde, constraint, steps, eps, denoise, step)
    nfe = steps * ((predict is not None) + (correct is not None) * corrector_steps) + bool(denoise)
    return C.finish(x, nfe)


@partial(jax.jit, static_argnames=("sde", "steps", "method", "denoise"))
def _constrained_ode(key, score_fn, sde, constraint, steps, method, eps, denoise):
    event = constraint.known.shape[1:]
    # One noise draw per example for the whole path: the known part moves smoothly, alpha(t) known + sigma(t) z.
    z_known = C.per_example_normal(C.example_keys(key, constraint.known.shape[0]), _PROJECT_AFTER_PREDICTOR, event)

    def drift(x, t):
        return probability_flow_drift(score_fn, sde, x, jnp.full((x.shape[0],), t, jnp.float32))

    def step(x, t, s, skeys, project):
        h = s - t
        d = drift(x, t)
        x_next = x + h * d
        if method == "heun":  # trapezoidal corrector on the projected Euler step
            x_next = constraint.project(sde, x_next, s, z_known)
            x_next = x + 0.5 * h * (d + drift(x_next, s))
        return constraint.project(sde, x_next, s, z_known)

    x = _constrained_loop(key, score_fn, sde, constraint, steps, eps, denoise, step)
    nfe = steps * (2 if method == "heun" else 1) + bool(denoise)
    return C.finish(x, nfe)


def _check_constraint(constraint: Constraint) -> Constraint:
    """The constraint in float32 with its mask broadcast to the data, or a ``ValueError`` naming what is wrong."""
    known = jnp.asarray(constraint.known)
    if known.ndim < 2 or 0 in known.shape:
        raise ValueError(f"the known data must have shape (batch, *event_shape), got {known.shape}")
    if not jnp.issubdtype(known.dtype, jnp.floating):
        raise ValueError(f"the known data must be floating point, got dtype {known.dtype}")
    known = known.astype(jnp.float32)
    mask = jnp.asarray(constraint.mask)
    try:
        fits = np.broadcast_shapes(mask.shape, known.shape) == known.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to the data's shape {known.shape}; valid: a shape "
            f"that broadcasts to it, e.g. {known.shape[1:]} (the same for every example) or {known.shape}"
        )
    values = _concrete(mask)
    if values is not None and not np.all((values == 0) | (values == 1)):
        bad = values[(values != 0) & (values != 1)]
        raise ValueError(f"mask must hold 0 (unknown) and 1 (known) only, got the value {bad.flat[0].item()!r}")
    mask = jnp.broadcast_to(mask.astype(jnp.float32), known.shape)
    transform = constraint.transform
    if transform is not None:
        transform = jnp.asarray(transform, jnp.float32)
        channels = known.shape[-1]
        if transform.shape != (channels, channels):
            raise ValueError(
                f"transform of shape {transform.shape} for data with {channels} channels; valid: an orthogonal "
                f"({channels}, {channels}) matrix"
            )
        values = _concrete(transform)
        if values is not None and not np.allclose(values.T @ values, np.eye(channels), rtol=0, atol=1e-5):
            raise ValueError("transform must be orthogonal (M^T M = I): only then does it commute with the SDE")
    return Constraint(known, mask, transform)


def constrained_sample(
    key: Array,
    score_fn: ScoreFn,
    sde: SDE,
    constraint: Constraint,
    *,
    method: str = "pc",
    steps: int | None = None,
    predictor: str | None = "reverse_diffusion",
    corrector: str | None = "langevin",
    snr: float = 0.16,
    corrector_steps: int = 1,
    eps: float = 1e-3,
    denoise: bool = False,
) -> tuple[Array, dict]:
    """Samples the unknown part of ``constraint`` by the reverse process with replacement (appendix I.2).

    At every step the known coordinates are replaced by ``alpha(t) known + sigma(t) z``: with fresh ``z`` at
    every sub-step for the stochastic samplers (as in the paper), with one ``z`` per example for the ODE
    (so the path stays smooth). The output holds ``known`` exactly.

    Args:
      key: PRNG key; example ``i`` draws from ``fold_in(key, i)`` only.
      score_fn: the unconditional ``score_fn(x, t)``.
      sde: the forward SDE.
      constraint: the known data, mask and basis.
      method: ``"pc"`` (any ``predictor`` and ``corrector`` of :mod:`jaxdiff.samplers.pc`; the names
        ``"euler_maruyama"``, ``"reverse_diffusion"``, ``"ancestral"`` mean that predictor alone), or
        ``"ode_euler"`` / ``"ode_heun"`` (``"ode"`` = Heun): fixed-step probability-flow ODE.
      steps: number of time steps (default ``sde.N``).
      predictor, corrector, snr, corrector_steps: as in :func:`jaxdiff.samplers.pc_sample`.
      eps: final time.
      denoise: apply Tweedie's formula at ``eps`` before putting the known part back.

    Returns:
      ``(x, info)`` with ``info["nfe"]``.

    Raises:
      ValueError: before anything is compiled, for a score whose output does not have the data's shape, a mask
        that does not broadcast to the data or holds values other than 0 and 1, or a transform that is not an
        orthogonal ``(C, C)`` matrix.
    """
    C.check_sde(sde)
    steps = C.check_steps(sde.N if steps is None else steps)
    eps = C.check_eps(eps, sde)
    constraint = _check_constraint(constraint)
    C.check_score_fn(score_fn, constraint.known.shape)
    score_fn = C.as_partial(score_fn)
    if method in ("euler_maruyama", "reverse_diffusion", "ancestral"):
        method, predictor, corrector = "pc", method, None
    if method == "pc":
        if predictor not in PREDICTORS or corrector not in CORRECTORS or (predictor is None and corrector is None):
            raise ValueError(
                f"invalid predictor/corrector {predictor!r}/{corrector!r}; "
                f"valid: {list(PREDICTORS)} and {list(CORRECTORS)}, not both None"
            )
        if predictor is not None:
            C.check_reverse_sde(sde, predictor)
        C.check_steps(corrector_steps, "corrector_steps")
        return _constrained_pc(
            key, score_fn, sde, constraint, steps, predictor, corrector, corrector_steps,
            jnp.float32(snr), jnp.float32(eps), bool(denoise),
        )  # fmt: skip
    ode_methods = {"ode": "heun", "ode_heun": "heun", "ode_euler": "euler"}
    if method in ode_methods:
        return _constrained_ode(
            key, score_fn, sde, constraint, steps, ode_methods[method], jnp.float32(eps), bool(denoise)
        )
    valid = ["pc", "euler_maruyama", "reverse_diffusion", "ancestral", *ode_methods]
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(valid)}")


def inpaint(
    key: Array,
    score_fn: ScoreFn,
    sde: SDE,
    x_known: Float[Array, " b *d"],
    mask,
    *,
    method: str = "pc",
    steps: int | None = None,
    **options,
) -> tuple[Float[Array, " b *d"], dict]:
    """Inpainting (Song et al. 2021, appendix I.2): fills in the coordinates where ``mask == 0``.

    Args:
      key: PRNG key.
      score_fn: the unconditional ``score_fn(x, t)``.
      sde: the forward SDE.
      x_known: data whose coordinates with ``mask == 1`` are kept (the rest is ignored).
      mask: 1 where known, broadcastable to ``x_known``.
      method, steps, **options: see :func:`constrained_sample`.

    Returns:
      ``(x, info)``; ``x`` equals ``x_known`` bit for bit where ``mask == 1``.

    >>> from jaxdiff import GaussianMixture, VPSDE
    >>> sde, gm = VPSDE(), GaussianMixture.grid()
    >>> x0 = jnp.zeros((16, 2)).at[:, 0].set(2.0)
    >>> x, info = inpaint(jax.random.key(0), gm.score_fn(sde), sde, x0, jnp.array([1.0, 0.0]), steps=200)
    """
    return constrained_sample(key, score_fn, sde, Constraint(x_known, mask), method=method, steps=steps, **options)


def _decoupling_matrix() -> np.ndarray:
    # Orthonormal columns: the gray direction (1, 1, 1)/sqrt(3), then two directions orthogonal to it.
    q = np.array([[1, 1, 1], [-2, 1, 1], [0, 1, -1]], np.float64)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).T


DECOUPLE = _decoupling_matrix()
"""The paper's orthogonal decoupling matrix ``M`` (appendix I.3): in ``u = x @ M`` (channels last),
``u[..., 0] = sqrt(3) * gray`` and ``u[..., 1:]`` carry the colour."""


def grayscale(x: Float[Array, " b h w 3"]) -> Float[Array, " b h w 1"]:
    """The grayscale image of the colorization task: the mean of the three channels."""
    return jnp.mean(x, axis=-1, keepdims=True)


def colorize(
    key: Array,
    score_fn: ScoreFn,
    sde: SDE,
    gray: Float[Array, " b h w 1"],
    *,
    method: str = "pc",
    steps: int | None = None,
    **options,
) -> tuple[Float[Array, " b h w 3"], dict]:
    """Colorization (appendix I.3): samples a colour image whose :func:`grayscale` is ``gray``.

    In the decoupled basis ``u = x @ DECOUPLE`` the gray image is the known coordinate ``u[..., 0] = sqrt(3) gray``
    and the colour coordinates are inpainted with :func:`constrained_sample`.

    Args:
      key: PRNG key.
      score_fn: score of colour images ``(b, h, w, 3)``.
      sde: the forward SDE.
      gray: grayscale images ``(b, h, w, 1)`` (or ``(b, h, w)``).
      method, steps, **options: see :func:`constrained_sample`.

    Returns:
      ``(x, info)`` with ``grayscale(x) == gray`` up to float rounding.
    """
    gray = jnp.asarray(gray, jnp.float32)
    if gray.ndim == 3:
        gray = gray[..., None]
    if gray.ndim != 4 or gray.shape[-1] != 1:
        raise ValueError(f"gray must have shape (batch, height, width, 1), got {gray.shape}")
    known = jnp.concatenate([math.sqrt(3.0) * gray, jnp.zeros_like(gray), jnp.zeros_like(gray)], axis=-1)
    mask = jnp.array([1.0, 0.0, 0.0])
    constraint = Constraint(known, mask, jnp.asarray(DECOUPLE, jnp.float32))
    return constrained_sample(key, score_fn, sde, constraint, method=method, steps=steps, **options)


def make_mask(kind: str, shape: tuple[int, ...], key: Array | None = None, fraction: float = 0.5) -> Array:
    """An inpainting mask of ``shape = (h, w, c)`` or ``(b, h, w, c)``: 1 where known.

    Kinds: ``"left_half"`` (left half known), ``"center"`` (the central square of half the side unknown),
    ``"random"`` (each pixel known with probability ``1 - fraction``; needs ``key``).
    """
    h, w = shape[-3], shape[-2]
    if kind == "left_half":
        m = np.zeros((h, w), np.float32)
        m[:, : w // 2] = 1
    elif kind == "center":
        m = np.ones((h, w), np.float32)
        m[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = 0
    elif kind == "random":
        if key is None:
            raise ValueError("mask 'random' needs a key")
        lead = shape[:-3]
        return jnp.broadcast_to((jax.random.uniform(key, (*lead, h, w, 1)) >= fraction).astype(jnp.float32), shape)
    else:
        raise ValueError(f"unknown mask {kind!r}; valid: left_half, center, random")
    return jnp.broadcast_to(jnp.asarray(m)[..., None], shape)
