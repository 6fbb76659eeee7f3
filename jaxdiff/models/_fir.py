"""FIR up- and down-sampling of NHWC images (StyleGAN2, Karras et al. 2020).

NCSN++ (Song et al., ICLR 2021, Appendix H.1) resamples feature maps with a finite-impulse-response
low-pass filter, by default the separable kernel ``(1, 3, 3, 1)``, instead of nearest-neighbour
upsampling and average pooling. Everything here reduces to one primitive, :func:`upfirdn2d`: insert
zeros (upsample), pad, convolve depthwise with the filter, keep every ``down``-th pixel.

:class:`FIRConv` fuses a 3x3 convolution with the resampling so that the padding is applied once
(StyleGAN2's ``upsample_conv_2d`` and ``conv_downsample_2d``); it is used for the learned
resampling layers of NCSN++.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models._init import default_init

Array = jax.Array

__all__ = ["upfirdn2d", "upsample_2d", "downsample_2d", "FIRConv", "fir_filter"]

_DIMS = ("NHWC", "HWIO", "NHWC")


def fir_filter(kernel: Sequence[float]) -> np.ndarray:
    """Turns a 1-D (separable) or 2-D filter into a square 2-D filter that sums to one."""
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"a FIR kernel must be 1-D or square 2-D, got shape {k.shape}")
    total = k.sum()
    if total == 0:
        raise ValueError("a FIR kernel must not sum to zero")
    return k / total


def upfirdn2d(x: Array, k: np.ndarray, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)):
    """Upsamples by zero insertion, pads, filters with ``k`` and downsamples, per channel.

    Args:
        x: images of shape ``(batch, height, width, channels)``.
        k: square 2-D filter (a true convolution: the filter is flipped).
        up: upsampling factor (``up - 1`` zeros inserted after every pixel).
        down: downsampling factor (every ``down``-th output pixel is kept).
        pad: pixels added before and after on both spatial axes (negative crops).

    Returns:
        The resampled images, ``(batch, (height * up + sum(pad) - k + 1) / down, ..., channels)``.
    """
    n, h, w, c = x.shape
    if up > 1:
        x = jnp.reshape(x, (n, h, 1, w, 1, c))
        x = jnp.pad(x, ((0, 0), (0, 0), (0, up - 1), (0, 0), (0, up - 1), (0, 0)))
        x = jnp.reshape(x, (n, h * up, w * up, c))
    p0, p1 = pad
    x = jnp.pad(x, ((0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0)), (0, 0)))
    x = x[:, max(-p0, 0) : x.shape[1] - max(-p1, 0), max(-p0, 0) : x.shape[2] - max(-p1, 0), :]
    # Depthwise convolution: one copy of the (flipped) filter per channel.
    kernel = jnp.asarray(np.ascontiguousarray(k[::-1, ::-1]), dtype=x.dtype)
    kernel = jnp.tile(kernel[:, :, None, None], (1, 1, 1, c))
    return jax.lax.conv_general_dilated(
        x, kernel, (down, down), "VALID", dimension_numbers=_DIMS, feature_group_count=c
    )


def upsample_2d(x: Array, kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Array:
    """FIR upsampling by ``factor``; a constant image stays constant away from the border."""
    k = fir_filter(kernel) * factor**2
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Array, kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Array:
    """FIR downsampling by ``factor`` (``kernel=(1, 1)`` is average pooling)."""
    k = fir_filter(kernel)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


class FIRConv(nn.Module):
    """A square convolution fused with FIR upsampling or downsampling by two.

    Attributes:
        features: output channels.
        up: upsample by two (zero insertion, convolution, FIR filter).
        down: downsample by two (FIR filter, strided convolution).
        fir_kernel: the FIR filter.
        kernel_size: odd spatial size of the convolution.
        init_scale: scale of the DDPM ``fan_avg`` uniform initialiser.
        dtype: compute dtype of the convolution and the filter (the parameters are float32).
    """

    features: int
    up: bool = False
    down: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    kernel_size: int = 3
    init_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.up and self.down:
            raise ValueError("FIRConv cannot both upsample and downsample")
        ks = self.kernel_size
        w = self.param("kernel", default_init(self.init_scale), (ks, ks, x.shape[-1], self.features), jnp.float32)
        b = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, w, b = x.astype(self.dtype), w.astype(self.dtype), b.astype(self.dtype)
        if self.up:
            k = fir_filter(self.fir_kernel) * 4
            p = (k.shape[0] - 2) - (ks - 1)
            h = jax.lax.conv_transpose(x, w, (2, 2), "VALID", dimension_numbers=_DIMS)
            h = upfirdn2d(h, k, pad=((p + 1) // 2 + 1, p // 2 + 1))
        elif self.down:
            k = fir_filter(self.fir_kernel)
            p = (k.shape[0] - 2) + (ks - 1)
            h = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
            h = jax.lax.conv_general_dilated(h, w, (2, 2), "VALID", dimension_numbers=_DIMS)
        else:
            h = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DIMS)
        return h + b
