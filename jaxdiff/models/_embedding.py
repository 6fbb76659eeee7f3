"""Embeddings of the noise level and of class labels.

The network embeds its ``noise_cond`` input exactly as given. Which quantity is passed is the
caller's choice (the parameterization module's, in this library): the score-SDE paper feeds
``log(sigma)`` to the Gaussian Fourier features of its VE models and ``999 * t`` to the sinusoidal
positional embedding of its VP models (Song et al., ICLR 2021, Appendix H.1).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["GaussianFourierProjection", "sinusoidal_embedding", "EMBEDDING_TYPES", "embed_noise"]

EMBEDDING_TYPES = ("fourier", "positional")


class GaussianFourierProjection(nn.Module):
    """Random Fourier features ``[sin(2 pi W s), cos(2 pi W s)]`` (Tancik et al., 2020).

    ``W ~ N(0, scale^2)`` is drawn once at initialisation and then frozen: it lives in ``params``
    (so it is saved and restored with the model, and counted as in the reference implementation)
    but gradients are stopped, so it never changes under a gradient-based optimiser.

    Attributes:
        embedding_size: number of frequencies; the output has ``2 * embedding_size`` features.
        scale: standard deviation of the frequencies (16 for the paper's CIFAR-10 models).
    """

    embedding_size: int = 256
    scale: float = 1.0

    @nn.compact
    def __call__(self, s: Array) -> Array:
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
        w = jax.lax.stop_gradient(w)
        proj = s[:, None] * w[None, :] * (2 * math.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def sinusoidal_embedding(s: Array, dim: int, max_positions: float = 10_000.0) -> Array:
    """Transformer sinusoidal embedding of a (real) position ``s``, as in DDPM.

    Args:
        s: positions of shape ``(batch,)``.
        dim: embedding size (zero-padded when odd).
        max_positions: the longest wavelength, ``2 pi max_positions``.

    Returns:
        ``(batch, dim)`` array ``[sin(s w_k), cos(s w_k)]`` with geometric frequencies ``w_k``.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_positions) / max(half - 1, 1) * jnp.arange(half, dtype=s.dtype))
    args = s[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def embed_noise(noise_cond: Array, embedding_type: str, size: int, fourier_scale: float) -> Array:
    """Fourier (``2 * size`` features) or positional (``size`` features) embedding.

    Must be called inside a compact Flax method (the Fourier features own a parameter).
    """
    if embedding_type == "fourier":
        return GaussianFourierProjection(size, fourier_scale, name="fourier_proj")(noise_cond)
    return sinusoidal_embedding(noise_cond, size)
