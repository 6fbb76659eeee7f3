"""Building blocks of NCSN++ and DDPM++ (Song et al., ICLR 2021, Appendix H.1).

The paper improves the DDPM U-Net (Ho et al., 2020) with: FIR resampling (StyleGAN2), residual
sums rescaled by ``1/sqrt(2)`` (``skip_rescale``), BigGAN-style residual blocks that resample
inside the block, and progressive growing of the input and output (``Combine`` and pyramids, in
the U-Net module). All convolutions use DDPM's ``fan_avg`` uniform initialisation; the last layer
of every residual branch is initialised at ``init_scale`` (zero in the paper's configs).

Mixed precision: every block takes a compute ``dtype``. Convolutions, dense layers, attention products and
FIR resampling compute in it; parameters are created in float32 (``param_dtype``) and cast at use, group
normalisation and the attention softmax compute in float32 whatever ``dtype`` is, and the activations
between blocks (the residual stream) are held in ``dtype``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models._fir import FIRConv, downsample_2d, upsample_2d
from jaxdiff.models._init import default_init

Array = jax.Array
DType = Any

__all__ = [
    "conv3x3",
    "residual_sum",
    "conv1x1",
    "dense",
    "group_norm",
    "Upsample",
    "Downsample",
    "Combine",
    "AttnBlock",
    "ResnetBlockDDPM",
    "ResnetBlockBigGAN",
]


def conv3x3(
    features: int,
    init_scale: float = 1.0,
    stride: int = 1,
    name: str | None = None,
    dtype: DType = jnp.float32,
) -> nn.Conv:
    """3x3 convolution with DDPM initialisation and zero bias, computing in ``dtype``."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding="SAME",
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def conv1x1(features: int, init_scale: float = 1.0, dtype: DType = jnp.float32) -> nn.Conv:
    """1x1 convolution with DDPM initialisation and zero bias, computing in ``dtype``."""
    return nn.Conv(
        features,
        (1, 1),
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
    )


def dense(features: int, init_scale: float = 1.0, name: str | None = None, dtype: DType = jnp.float32) -> nn.Dense:
    """Dense layer (a 1x1 "network-in-network" on the channel axis) with DDPM initialisation."""
    return nn.Dense(features, kernel_init=default_init(init_scale), dtype=dtype, param_dtype=jnp.float32, name=name)


class GroupNorm(nn.Module):
    """Group normalisation over NHWC (or ``(batch, features)``) activations, computed in float32.

    The parameters are ``nn.GroupNorm``'s (``scale`` and ``bias`` per channel, the same names and the same module
    name), and so is the result: ``(x - mean) / sqrt(var + eps) * scale + bias`` with each group's mean and
    variance over its channels and every pixel (``var = E[x^2] - mean^2``, as Flax computes it by default). The
    statistics are reduced per channel over the pixels first (a contiguous reduction in NHWC) and then over each
    group's few channels, and the normalisation is applied as one per-channel affine map ``x a + d``: on the CPU
    this takes a fraction of the time of Flax's reshape into groups, forward and backward
    (``python benchmarks/train_breakdown.py --sections group_norm_step``).

    Attributes:
      num_groups: number of groups; must divide the channel count.
      epsilon: added to the variance.
    """

    num_groups: int
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.asarray(x, jnp.float32)  # statistics and output in float32 whatever the compute dtype
        c, g = x.shape[-1], self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm: num_groups={g} does not divide the {c} channels")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        pixels = tuple(range(1, x.ndim - 1))
        count = math.prod(x.shape[1:-1]) * (c // g)
        per_group = lambda s: jnp.sum(s.reshape(x.shape[0], g, c // g), axis=-1, keepdims=True)  # noqa: E731
        mean = per_group(jnp.sum(x, axis=pixels)) / count
        mean_sq = per_group(jnp.sum(jnp.square(x), axis=pixels)) / count
        inv = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + self.epsilon)
        a = jnp.broadcast_to(inv, (x.shape[0], g, c // g)).reshape(x.shape[0], c) * scale
        d = bias - jnp.broadcast_to(mean, (x.shape[0], g, c // g)).reshape(x.shape[0], c) * a
        expand = (x.shape[0],) + (1,) * len(pixels) + (c,)
        return x * a.reshape(expand) + d.reshape(expand)


def group_norm(channels: int) -> GroupNorm:
    """Group normalisation with ``min(channels // 4, 32)`` groups, as in the reference code.

    When that number does not divide ``channels`` (the reference code would fail there), the largest
    smaller divisor is used instead. It computes in float32 whatever its input's dtype (statistics and
    normalised output), so a bfloat16 network normalises in full precision.
    """
    return GroupNorm(num_groups=group_count(channels), epsilon=1e-6)


def group_count(channels: int) -> int:
    """The number of groups :func:`group_norm` uses for ``channels``."""
    groups = max(min(channels // 4, 32), 1)
    while channels % groups:
        groups -= 1
    return groups


def residual_sum(x: Array, h: Array, skip_rescale: bool) -> Array:
    """``x + h``, divided by ``sqrt(2)`` to keep the variance when ``skip_rescale``."""
    return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


def _nearest_up(x: Array) -> Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _mean_down(x: Array) -> Array:
    n, h, w, c = x.shape
    return jnp.mean(jnp.reshape(x, (n, h // 2, 2, w // 2, 2, c)), axis=(2, 4))


class Upsample(nn.Module):
    """Doubles the spatial size: nearest or FIR, optionally with a (fused) 3x3 convolution.

    Without a convolution the channel count is kept and ``out_ch`` must be ``None``. The output is in
    ``dtype``.
    """

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        x = x.astype(self.dtype)
        if self.with_conv and self.fir:
            return FIRConv(out_ch, up=True, fir_kernel=self.fir_kernel, dtype=self.dtype)(x)
        h = upsample_2d(x, self.fir_kernel) if self.fir else _nearest_up(x)
        return conv3x3(out_ch, dtype=self.dtype)(h) if self.with_conv else h


class Downsample(nn.Module):
    """Halves the spatial size: average pooling or FIR, or a strided (fused) 3x3 convolution.

    The output is in ``dtype``.
    """

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        x = x.astype(self.dtype)
        if self.with_conv:
            if self.fir:
                return FIRConv(out_ch, down=True, fir_kernel=self.fir_kernel, dtype=self.dtype)(x)
            # DDPM pads (0, 1) before its stride-2 convolution, which is what SAME does here.
            return conv3x3(out_ch, stride=2, dtype=self.dtype)(x)
        return downsample_2d(x, self.fir_kernel) if self.fir else _mean_down(x)


class Combine(nn.Module):
    """Merges an input-pyramid level into the feature map (progressive input ``input_skip``).

    The pyramid level is projected to the feature channels by a 1x1 convolution, then summed with or
    concatenated to the features.
    """

    method: str = "cat"
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, pyramid: Array, h: Array) -> Array:
        p = conv1x1(h.shape[-1], dtype=self.dtype)(pyramid)
        return jnp.concatenate([p, h], axis=-1) if self.method == "cat" else p + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection (DDPM).

    Attributes:
        skip_rescale: divide the residual sum by ``sqrt(2)``.
        init_scale: initial scale of the output projection.
        dtype: compute dtype of the projections and the two attention products; the attention
            logits and softmax are float32 either way.
    """

    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hh, ww, c = x.shape
        h = group_norm(c)(x)
        # 1x1 "network-in-network" projections (dense layers on the channel axis).
        q = dense(c, 0.1, name="query", dtype=self.dtype)(h)
        k = dense(c, 0.1, name="key", dtype=self.dtype)(h)
        v = dense(c, 0.1, name="value", dtype=self.dtype)(h)
        q = jnp.reshape(q, (b, hh * ww, c))
        k = jnp.reshape(k, (b, hh * ww, c))
        v = jnp.reshape(v, (b, hh * ww, c))
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        w = jax.nn.softmax(logits / math.sqrt(c), axis=-1).astype(self.dtype)
        h = jnp.reshape(jnp.einsum("bqk,bkc->bqc", w, v), (b, hh, ww, c))
        h = dense(c, self.init_scale, name="out", dtype=self.dtype)(h)
        return residual_sum(x.astype(self.dtype), h, self.skip_rescale)


def _add_time_bias(h: Array, temb: Array | None, act, dtype: DType) -> Array:
    """Adds a per-channel bias computed from the (time and label) embedding."""
    if temb is None:
        return h
    bias = dense(h.shape[-1], name="temb_proj", dtype=dtype)(act(temb))
    return h + bias[:, None, None, :]


class ResnetBlockDDPM(nn.Module):
    """The DDPM residual block: GN-act-conv, time bias, GN-act-dropout-conv, plus shortcut.

    Attributes:
        out_ch: output channels (default: input channels).
        dropout: dropout rate before the second convolution (only with ``train=True``).
        skip_rescale: divide the residual sum by ``sqrt(2)``.
        init_scale: initial scale of the second convolution.
        act: activation.
        dtype: compute dtype of the convolutions and dense layers, and of the output.
    """

    out_ch: int | None = None
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0
    act: Callable[[Array], Array] = nn.silu
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
        c = x.shape[-1]
        out_ch = self.out_ch or c
        h = self.act(group_norm(c)(x))
        h = conv3x3(out_ch, dtype=self.dtype)(h)
        h = _add_time_bias(h, temb, self.act, self.dtype)
        h = self.act(group_norm(out_ch)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(out_ch, init_scale=self.init_scale, dtype=self.dtype)(h)
        if c != out_ch:
            x = dense(out_ch, 0.1, name="shortcut", dtype=self.dtype)(x)
        return residual_sum(x.astype(self.dtype), h, self.skip_rescale)


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block that can resample both branches (Brock et al., 2019).

    Up/down-sampling happens after the first activation, by FIR or nearest/average resampling; the
    shortcut then gets a 1x1 convolution.

    Attributes:
        out_ch: output channels (default: input channels).
        up: double the spatial size.
        down: halve the spatial size.
        dropout: dropout rate before the second convolution (only with ``train=True``).
        fir: FIR resampling instead of nearest/average.
        fir_kernel: the FIR filter.
        skip_rescale: divide the residual sum by ``sqrt(2)``.
        init_scale: initial scale of the second convolution.
        act: activation.
        dtype: compute dtype of the convolutions, dense layers and resampling, and of the output.
    """

    out_ch: int | None = None
    up: bool = False
    down: bool = False
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    act: Callable[[Array], Array] = nn.silu
    dtype: DType = jnp.float32

    def _resample(self, x: Array) -> Array:
        x = x.astype(self.dtype)
        if self.up:
            return upsample_2d(x, self.fir_kernel) if self.fir else _nearest_up(x)
        if self.down:
            return downsample_2d(x, self.fir_kernel) if self.fir else _mean_down(x)
        return x

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
        c = x.shape[-1]
        out_ch = self.out_ch or c
        h = self.act(group_norm(c)(x))
        h = self._resample(h)
        x = self._resample(x)
        h = conv3x3(out_ch, dtype=self.dtype)(h)
        h = _add_time_bias(h, temb, self.act, self.dtype)
        h = self.act(group_norm(out_ch)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(out_ch, init_scale=self.init_scale, dtype=self.dtype)(h)
        if c != out_ch or self.up or self.down:
            x = conv1x1(out_ch, dtype=self.dtype)(x)
        return residual_sum(x, h, self.skip_rescale)
