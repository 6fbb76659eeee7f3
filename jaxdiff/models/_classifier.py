"""A noise-conditional classifier ``p_t(y | x_t)`` for classifier guidance (Song et al., ICLR 2021, appendix I.1).

The network is a Flax Linen module like the score networks: ``model.apply(variables, x, noise_cond)`` with the
noise level embedded as given. Around it, the functions that bind it to an SDE (its noise input for time ``t``,
as :func:`jaxdiff.parameterization.noise_cond` gives the score networks theirs), its per-example loss on perturbed
data and a small training loop. Guidance (:mod:`jaxdiff.guidance`) sees only the log-probability function
``log_prob_y_fn(x, t) -> (batch, num_classes)`` that :func:`make_classifier_log_prob_fn` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.tree_util import Partial
from jaxtyping import Array, Float, Int

from jaxdiff.models._checks import check_choice, check_dtype, check_noise_cond
from jaxdiff.models._embedding import EMBEDDING_TYPES, embed_noise
from jaxdiff.parameterization import noise_cond
from jaxdiff.sde import SDE

__all__ = [
    "NoiseConditionalClassifier",
    "make_classifier_apply",
    "make_classifier_log_prob_fn",
    "noise_conditional_classifier_loss",
    "train_classifier",
]


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
      dtype: compute dtype of the convolutions and dense layers, ``'float32'`` or ``'bfloat16'``; the
        parameters, the noise-level embedding and the logits are float32 either way.

    Example:
      >>> model = NoiseConditionalClassifier(num_classes=3, hidden_sizes=(16,))
      >>> x, s = jnp.zeros((4, 2)), jnp.zeros((4,))
      >>> variables = model.init(jax.random.key(0), x, s)
      >>> model.apply(variables, x, s).shape
      (4, 3)
    """

    num_classes: int
    hidden_sizes: tuple[int, ...] = (128, 128)
    conv_channels: tuple[int, ...] = (32, 64)
    embedding_size: int = 32
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "embedding_type", check_choice("embedding_type", self.embedding_type, EMBEDDING_TYPES))
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, Integral) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, noise_cond: Array, train: bool = False) -> Array:
        if x.ndim not in (2, 4):
            raise ValueError(f"x must be (batch, d) or (batch, H, W, C), got shape {x.shape}")
        check_noise_cond(noise_cond, x.shape[0])
        temb = embed_noise(
            jnp.asarray(noise_cond, jnp.float32), self.embedding_type, self.embedding_size, self.fourier_scale
        )
        mixed = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.float32)  # float32 parameters, computed in dtype
        temb = nn.Dense(self.embedding_size, name="temb_dense", **mixed)(temb)
        h = x.astype(jnp.float32)
        if h.ndim == 4:
            for i, ch in enumerate(self.conv_channels):
                h = nn.Conv(ch, (3, 3), strides=(2, 2), name=f"conv_{i}", **mixed)(h)
                h = h + nn.Dense(ch, name=f"temb_conv_{i}", **mixed)(nn.silu(temb))[:, None, None, :]
                h = nn.silu(h)
            h = jnp.mean(h, axis=(1, 2), dtype=jnp.float32)  # global pooling summed in float32
        for i, width in enumerate(self.hidden_sizes):
            h = nn.Dense(width, name=f"dense_{i}", **mixed)(h)
            h = h + nn.Dense(width, name=f"temb_proj_{i}", **mixed)(nn.silu(temb))
            h = nn.silu(h)
        return nn.Dense(self.num_classes, name="logits", **mixed)(h).astype(jnp.float32)


def _classifier_apply(model, sde, params, x, t):
    return model.apply({"params": params}, x, noise_cond(t, sde, model.embedding_type))


def make_classifier_apply(model: NoiseConditionalClassifier, sde: SDE) -> Partial:
    """``classifier_apply(params, x_t, t) -> logits``: the network fed its noise input for time ``t``."""
    return Partial(_classifier_apply, model, sde)


def _classifier_log_prob(model, sde, params, x, t):
    return jax.nn.log_softmax(_classifier_apply(model, sde, params, x, t).astype(jnp.float32), axis=-1)


def make_classifier_log_prob_fn(model: NoiseConditionalClassifier, params, sde: SDE) -> Partial:
    """``log_prob_y_fn(x, t) -> (batch, num_classes)`` of a trained classifier, for
    :func:`jaxdiff.guidance.classifier_guided_score_fn`."""
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
    ``t`` from ``fold_in(fold_in(key, i), 0)`` and ``z`` from ``fold_in(fold_in(key, i), 1)``.

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
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(x.shape[0]))
    t = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (), jnp.float32, eps, sde.T))(keys)
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x.shape[1:]))(keys)
    mean, std = sde.marginal_prob(x.astype(jnp.float32), t)
    x_t = mean + jnp.reshape(std, std.shape + (1,) * (x.ndim - std.ndim)) * z
    logits = classifier_apply(params, x_t, t).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


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
