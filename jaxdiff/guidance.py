"""Controllable generation: classifier guidance, classifier-free guidance, inpainting and colorization.

Song et al., ICLR 2021, sec. 5 and appendix I. Given the unconditional score ``s(x, t) = grad log p_t(x)``:

* **Classifier guidance** (eq. 14; Dhariwal & Nichol 2021): the conditional score is
  ``grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x)``, so a noise-conditional classifier
  ``p_t(y | x)`` trained on perturbed data (:func:`noise_conditional_classifier_loss`) turns an
  unconditional model into a conditional one. A ``scale`` other than 1 samples
  ``p_t(x) p_t(y | x)^scale`` (sharper for ``scale > 1``).
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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial
from jaxtyping import Array, Float, Int

from jaxdiff.models._embedding import EMBEDDING_TYPES, embed_noise
from jaxdiff.oracle import GaussianMixture
from jaxdiff.parameterization import noise_cond
from jaxdiff.per_example import per_example, unwrap
from jaxdiff.samplers import _common as C
from jaxdiff.samplers.ode import probability_flow_drift
from jaxdiff.samplers.pc import CORRECTORS, PREDICTORS, tweedie_denoise
from jaxdiff.sde import SDE

__all__ = [
    "classifier_guided_score_fn",
    "classifier_free_guided_score_fn",
    "mixture_classifier_log_probs",
    "NoiseConditionalClassifier",
    "make_classifier_log_prob_fn",
    "noise_conditional_classifier_loss",
    "train_classifier",
    "Constraint",
    "constrained_sample",
    "inpaint",
    "DECOUPLE",
    "grayscale",
    "colorize",
    "make_mask",
]

ScoreFn = Callable[[Array, Array], Array]


# ==========================================================================================================
# Classifier guidance
# ==========================================================================================================
def _classifier_guided(score_fn, log_prob_y_fn, y, scale, x, t):
    y = jnp.broadcast_to(unwrap(y), x.shape[:1])

    def log_p_y(x):  # summed over the batch: each example's gradient is its own
        return jnp.sum(jnp.take_along_axis(log_prob_y_fn(x, t), y[:, None], axis=-1))

    grad = jax.grad(log_p_y)(x)
    return score_fn(x, t) + scale * grad.astype(x.dtype)


def classifier_guided_score_fn(
    score_fn: ScoreFn, log_prob_y_fn: Callable[[Array, Array], Array], y, scale: float = 1.0
) -> Partial:
    """The score of ``p_t(x | y)``: ``s(x, t) + scale * grad_x log p_t(y | x)`` (eq. 14 of Song et al. 2021).

    Args:
      score_fn: the unconditional ``score_fn(x, t)``.
      log_prob_y_fn: ``log_prob_y_fn(x, t) -> (batch, num_classes)`` log-probabilities of a noise-conditional
        classifier ``p_t(y | x)`` (e.g. :func:`make_classifier_log_prob_fn`).
      y: the target class, a scalar or labels of shape ``(batch,)``.
      scale: guidance scale; 1 samples ``p(x | y)``, larger values sharpen towards the class.

    Returns:
      A :class:`jax.tree_util.Partial` ``score_fn(x, t)`` (its arrays are traced by the samplers).

    >>> from jaxdiff import GaussianMixture, VPSDE
    >>> sde, gm = VPSDE(), GaussianMixture.grid()
    >>> guided = classifier_guided_score_fn(gm.score_fn(sde), mixture_classifier_log_probs(gm, sde), y=2)
    >>> x, info = jaxdiff.sample(jax.random.key(0), guided, sde, (16, 2), method="pc", steps=100)
    """
    return Partial(
        _classifier_guided,
        C.as_partial(score_fn),
        C.as_partial(log_prob_y_fn),
        per_example(jnp.asarray(y, jnp.int32)),
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
# Noise-conditional classifier: model, loss, training
# ==========================================================================================================
class NoiseConditionalClassifier(nn.Module):
    """A small classifier ``(x, noise_cond) -> logits`` of perturbed vectors ``(b, d)`` or images ``(b, H, W, C)``.

    Images go through strided 3x3 convolutions and global average pooling; vectors straight to the MLP. The
    noise level is embedded as in the score networks and added to every hidden layer.

    Attributes:
      num_classes: number of classes.
      hidden_sizes: widths of the dense layers.
      conv_channels: channels of the strided convolutions (images only).
      embedding_size: size of the noise-level embedding.
      embedding_type: ``'fourier'`` (fed ``log sigma``) or ``'positional'`` (fed ``999 t``).
      fourier_scale: standard deviation of the Fourier frequencies.
    """

    num_classes: int
    hidden_sizes: tuple[int, ...] = (128, 128)
    conv_channels: tuple[int, ...] = (32, 64)
    embedding_size: int = 32
    embedding_type: str = "positional"
    fourier_scale: float = 16.0

    @nn.compact
    def __call__(self, x: Array, noise_cond: Array, train: bool = False) -> Array:
        if self.embedding_type not in EMBEDDING_TYPES:
            raise ValueError(f"unknown embedding_type {self.embedding_type!r}; valid: {', '.join(EMBEDDING_TYPES)}")
        temb = embed_noise(
            jnp.asarray(noise_cond, jnp.float32), self.embedding_type, self.embedding_size, self.fourier_scale
        )
        temb = nn.Dense(self.embedding_size, name="temb_dense")(temb)
        h = x.astype(jnp.float32)
        if h.ndim == 4:
            for i, ch in enumerate(self.conv_channels):
                h = nn.Conv(ch, (3, 3), strides=(2, 2), name=f"conv_{i}")(h)
                h = h + nn.Dense(ch, name=f"temb_conv_{i}")(nn.silu(temb))[:, None, None, :]
                h = nn.silu(h)
            h = jnp.mean(h, axis=(1, 2))
        elif h.ndim != 2:
            raise ValueError(f"x must be (batch, d) or (batch, H, W, C), got shape {x.shape}")
        for i, width in enumerate(self.hidden_sizes):
            h = nn.Dense(width, name=f"dense_{i}")(h) + nn.Dense(width, name=f"temb_proj_{i}")(nn.silu(temb))
            h = nn.silu(h)
        return nn.Dense(self.num_classes, name="logits")(h)


def _classifier_apply(model, sde, params, x, t):
    return model.apply({"params": params}, x, noise_cond(t, sde, model.embedding_type))


def make_classifier_apply(model: NoiseConditionalClassifier, sde: SDE) -> Partial:
    """``classifier_apply(params, x_t, t) -> logits``: the network fed its noise input for time ``t``."""
    return Partial(_classifier_apply, model, sde)


def _classifier_log_prob(model, sde, params, x, t):
    return jax.nn.log_softmax(_classifier_apply(model, sde, params, x, t).astype(jnp.float32), axis=-1)


def make_classifier_log_prob_fn(model: NoiseConditionalClassifier, params, sde: SDE) -> Partial:
    """``log_prob_y_fn(x, t) -> (batch, num_classes)`` of a trained classifier (for guidance)."""
    return Partial(_classifier_log_prob, model, sde, params)


def noise_conditional_classifier_loss(
    key: Array,
    classifier_apply: Callable,
    params,
    sde: SDE,
    x: Float[Array, " b *d"],
    y: Int[Array, " b"],
    eps: float = 1e-5,
) -> Float[Array, " b"]:
    """Per-example cross-entropy ``-log p_t(y | x_t)`` of a classifier on perturbed data (appendix I.1).

    ``t ~ U(eps, T)`` and ``x_t = alpha(t) x + sigma(t) z`` from the perturbation kernel; example ``i`` draws
    from ``fold_in(key, i)``.

    Args:
      key: PRNG key.
      classifier_apply: ``classifier_apply(params, x_t, t) -> logits`` (:func:`make_classifier_apply`).
      params: the classifier's parameters.
      sde: the forward SDE.
      x: clean data.
      y: integer labels.
      eps: smallest time.

    Returns:
      The ``(batch,)`` losses, before any mean.
    """
    keys = C.example_keys(key, x.shape[0])
    t = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (), jnp.float32, eps, sde.T))(keys)
    z = C.per_example_normal(keys, 1, x.shape[1:])
    mean, std = sde.marginal_prob(x.astype(jnp.float32), t)
    x_t = mean + _bc(std, x) * z
    logits = classifier_apply(params, x_t, t).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _bc(a, x):
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def train_classifier(
    key: Array,
    model: NoiseConditionalClassifier,
    sde: SDE,
    x: Array,
    y: Array,
    *,
    steps: int = 1000,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    eps: float = 1e-5,
):
    """Trains a noise-conditional classifier with Adam on ``(x, y)`` held in memory.

    Returns:
      ``(params, losses)``: the trained parameters and the mean loss of every step.
    """
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
    apply = make_classifier_apply(model, sde)
    params = model.init(jax.random.fold_in(key, 0), x[:1], jnp.zeros((1,)))["params"]
    tx = optax.adam(learning_rate)

    @jax.jit
    def run(params, key):
        def step(carry, i):
            params, opt_state = carry
            k = jax.random.fold_in(key, i)
            idx = jax.random.randint(jax.random.fold_in(k, 0), (batch_size,), 0, x.shape[0])
            loss_fn = lambda p: jnp.mean(  # noqa: E731
                noise_conditional_classifier_loss(jax.random.fold_in(k, 1), apply, p, sde, x[idx], y[idx], eps)
            )
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
        return params, losses

    return run(params, jax.random.fold_in(key, 1))


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
    """
    C.check_sde(sde)
    steps = C.check_steps(sde.N if steps is None else steps)
    eps = C.check_eps(eps, sde)
    known = jnp.asarray(constraint.known, jnp.float32)
    C.check_shape(known.shape)
    mask = jnp.broadcast_to(jnp.asarray(constraint.mask, jnp.float32), known.shape)
    transform = None if constraint.transform is None else jnp.asarray(constraint.transform, jnp.float32)
    constraint = Constraint(known, mask, transform)
    score_fn = C.as_partial(score_fn)
    if method in ("euler_maruyama", "reverse_diffusion", "ancestral"):
        method, predictor, corrector = "pc", method, None
    if method == "pc":
        if predictor not in PREDICTORS or corrector not in CORRECTORS or (predictor is None and corrector is None):
            raise ValueError(
                f"invalid predictor/corrector {predictor!r}/{corrector!r}; "
                f"valid: {list(PREDICTORS)} and {list(CORRECTORS)}, not both None"
            )
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
