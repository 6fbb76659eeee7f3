"""NCSN++ and DDPM++: the U-Net score networks of the score-SDE paper.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021,
Section 4.4 and Appendix H.1. Both are one architecture, the DDPM U-Net (Ho et al., 2020) with five
optional improvements; the option names are those of the paper's reference configs, so its CIFAR-10
configurations are expressible verbatim:

* ``fir`` / ``fir_kernel``: FIR (anti-aliased) up- and down-sampling, as in StyleGAN2;
* ``skip_rescale``: every residual sum is divided by ``sqrt(2)``;
* ``resblock_type='biggan'``: residual blocks that resample inside the block, replacing the
  separate ``Upsample``/``Downsample`` layers of ``'ddpm'``;
* ``progressive_input`` (``'input_skip'`` or ``'residual'``): a pyramid of downsampled inputs is fed
  to every resolution of the encoder, merged by ``progressive_combine`` (``'sum'`` or ``'cat'``) or
  as a residual;
* ``progressive`` (``'output_skip'`` or ``'residual'``): the decoder's output is built as a pyramid,
  StyleGAN2-style, summing upsampled predictions from every resolution;
* more residual blocks per resolution (the "deep" variants).

:class:`NCSNpp` defaults to the paper's NCSN++ (VE, continuous) CIFAR-10 config, and :class:`DDPMpp`
to its DDPM++ (VP, continuous) one; they differ only in defaults.

Calling convention (shared with :class:`~jaxdiff.models.MLP`)::

    out = model.apply(variables, x, noise_cond, y=None, train=False, rngs={"dropout": key})

``noise_cond`` is embedded as given (the caller passes ``log(sigma)`` for Fourier features,
``999 t`` for positional ones), and the output, shaped like ``x``, has no fixed meaning: whether it
is a score, a noise prediction or a denoised image is decided by the parameterization that wraps
the network.
Mixed precision: ``dtype='bfloat16'`` computes every convolution, dense layer, attention product and
FIR resampling in bfloat16, while the parameters stay float32 (the parameter tree is the same for both
dtypes, so checkpoints load either way), the noise-level embedding, group normalisation and the
attention softmax compute in float32, and the output is returned in float32.

Unlike the reference code, the network neither rescales ``[0, 1]`` data to ``[-1, 1]`` nor divides
by ``sigma`` (``scale_by_sigma``); both belong to the data pipeline and the parameterization.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models._checks import check_choice, check_dtype, check_labels, check_noise_cond
from jaxdiff.models._embedding import EMBEDDING_TYPES, embed_noise
from jaxdiff.models._layers import (
    AttnBlock,
    Combine,
    Downsample,
    ResnetBlockBigGAN,
    ResnetBlockDDPM,
    Upsample,
    conv3x3,
    dense,
    group_norm,
    residual_sum,
)

Array = jax.Array

__all__ = ["NCSNpp", "DDPMpp"]

RESBLOCK_TYPES = ("ddpm", "biggan")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINE = ("sum", "cat")


class NCSNpp(nn.Module):
    """NCSN++ U-Net score network (Song et al., ICLR 2021, Appendix H.1).

    Defaults reproduce the paper's CIFAR-10 NCSN++ (continuous, VE) model; ``num_res_blocks=8``
    gives NCSN++ deep.

    Attributes:
        nf: base channel count.
        ch_mult: channel multiplier of each resolution; the image is halved ``len(ch_mult) - 1``
            times, so its size must be divisible by ``2 ** (len(ch_mult) - 1)``.
        num_res_blocks: residual blocks per resolution in the encoder (one more in the decoder).
        attn_resolutions: spatial sizes (heights) at which self-attention follows each block.
        dropout: dropout rate inside residual blocks, active only when called with ``train=True``.
        resamp_with_conv: learned (convolutional) resampling in ``'ddpm'`` blocks' resample layers.
        fir: FIR up/down-sampling instead of nearest-neighbour and average pooling.
        fir_kernel: the (separable) FIR filter.
        skip_rescale: divide every residual sum by ``sqrt(2)``.
        resblock_type: ``'ddpm'`` or ``'biggan'``.
        progressive: output pyramid, ``'none'``, ``'output_skip'`` or ``'residual'``.
        progressive_input: input pyramid, ``'none'``, ``'input_skip'`` or ``'residual'``.
        progressive_combine: how ``'input_skip'`` merges a pyramid level, ``'sum'`` or ``'cat'``.
        embedding_type: noise-level embedding, ``'fourier'`` or ``'positional'``.
        fourier_scale: standard deviation of the Gaussian Fourier frequencies.
        init_scale: initial scale of the last layer of each residual branch and of the output.
        conditional: condition on the noise level (``noise_cond`` is ignored when False, as for the
            unconditional score models of Appendix D).
        num_classes: if set, class-conditional: a learned label embedding, with ``num_classes + 1``
            rows, is added to the time embedding; label ``num_classes`` is the null class of
            classifier-free guidance (Ho & Salimans, 2022).
        dtype: compute dtype, ``'float32'`` or ``'bfloat16'`` (mixed precision: parameters, group
            normalisation, softmax and the output stay float32; see the module docstring).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = NCSNpp(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
        >>> x, s = jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,))
        >>> variables = model.init(jax.random.key(0), x, s)
        >>> model.apply(variables, x, s).shape
        (2, 8, 8, 3)
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    fir: bool = True
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0
    init_scale: float = 0.0
    conditional: bool = True
    num_classes: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        # Normalise config values (lists from config files, upper-case strings) and fail early.
        fix = lambda name, value: object.__setattr__(self, name, value)
        fix("ch_mult", tuple(int(m) for m in self.ch_mult))
        fix("attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        fix("fir_kernel", tuple(self.fir_kernel))
        fix("resblock_type", check_choice("resblock_type", self.resblock_type, RESBLOCK_TYPES))
        fix("progressive", check_choice("progressive", self.progressive, PROGRESSIVE))
        fix(
            "progressive_input",
            check_choice("progressive_input", self.progressive_input, PROGRESSIVE_INPUT),
        )
        fix(
            "progressive_combine",
            check_choice("progressive_combine", self.progressive_combine, PROGRESSIVE_COMBINE),
        )
        fix("embedding_type", check_choice("embedding_type", self.embedding_type, EMBEDDING_TYPES))
        fix("dtype", check_dtype(self.dtype))
        if self.nf < 1 or not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"need nf >= 1 and positive ch_mult, got {self.nf} and {self.ch_mult}")
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int or None, got {self.num_classes}")
        super().__post_init__()

    def _check_inputs(self, x: Array, noise_cond: Array, y: Array | None) -> None:
        if jnp.ndim(x) != 4:
            raise ValueError(f"x must be NHWC images of shape (batch, height, width, channels), got {x.shape}")
        _, height, width, channels = x.shape
        factor = 2 ** (len(self.ch_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"image size {height}x{width} is not divisible by 2**(len(ch_mult)-1) = {factor} "
                f"(ch_mult={self.ch_mult} halves the image {len(self.ch_mult) - 1} times)"
            )
        stem = self.variables.get("params", {}).get("conv_in")
        if stem is not None and stem["kernel"].shape[2] != channels:
            raise ValueError(
                f"the model was initialised for {stem['kernel'].shape[2]} input channels, got "
                f"x with {channels} channels (shape {x.shape})"
            )
        check_noise_cond(noise_cond, x.shape[0])
        check_labels(y, self.num_classes, x.shape[0])

    @property
    def _dtype(self):
        return jnp.dtype(self.dtype)

    def _resblock(self, out_ch: int | None = None, up: bool = False, down: bool = False):
        if self.resblock_type == "ddpm":
            return ResnetBlockDDPM(
                out_ch=out_ch,
                dropout=self.dropout,
                skip_rescale=self.skip_rescale,
                init_scale=self.init_scale,
                dtype=self._dtype,
            )
        return ResnetBlockBigGAN(
            out_ch=out_ch,
            up=up,
            down=down,
            dropout=self.dropout,
            fir=self.fir,
            fir_kernel=self.fir_kernel,
            skip_rescale=self.skip_rescale,
            init_scale=self.init_scale,
            dtype=self._dtype,
        )

    def _attn(self):
        return AttnBlock(skip_rescale=self.skip_rescale, init_scale=self.init_scale, dtype=self._dtype)

    @nn.compact
    def __call__(self, x: Array, noise_cond: Array, y: Array | None = None, train: bool = False) -> Array:
        """Evaluates the network.

        Args:
            x: images of shape ``(batch, height, width, channels)``.
            noise_cond: noise-level input of shape ``(batch,)``, embedded as given.
            y: integer labels of shape ``(batch,)`` (``num_classes`` = null class), only for a
                class-conditional model.
            train: enables dropout (needs an rng named ``'dropout'``).

        Returns:
            An array shaped like ``x``, float32 whatever the compute dtype.
        """
        self._check_inputs(x, noise_cond, y)
        act = nn.silu
        dtype = self._dtype
        nf, n_levels, channels = self.nf, len(self.ch_mult), x.shape[-1]
        # The noise level is embedded in at least float32 (bfloat16 cannot tell 999 t from its neighbours).
        if jnp.issubdtype(x.dtype, jnp.floating):
            noise_cond = jnp.asarray(noise_cond, jnp.promote_types(x.dtype, jnp.float32))
        else:
            noise_cond = jnp.asarray(noise_cond, jnp.float32)

        # -- time (noise level) and label embedding ------------------------------------------
        temb = None
        if self.conditional:
            emb = embed_noise(noise_cond, self.embedding_type, nf, self.fourier_scale)
            temb = dense(4 * nf, name="temb_dense_0", dtype=dtype)(emb)
            temb = dense(4 * nf, name="temb_dense_1", dtype=dtype)(act(temb))
        if self.num_classes is not None:
            label = nn.Embed(self.num_classes + 1, 4 * nf, dtype=dtype, param_dtype=jnp.float32, name="label_embed")(y)
            temb = label if temb is None else temb + label

        resample = dict(fir=self.fir, fir_kernel=self.fir_kernel, dtype=dtype)

        # -- encoder ------------------------------------------------------------------------
        input_pyramid = x if self.progressive_input != "none" else None
        hs = [conv3x3(nf, name="conv_in", dtype=dtype)(x)]
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = self._resblock(nf * mult)(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = self._attn()(h)
                hs.append(h)
            if level == n_levels - 1:
                break
            if self.resblock_type == "ddpm":
                h = Downsample(with_conv=self.resamp_with_conv, **resample)(hs[-1])
            else:
                h = self._resblock(down=True)(hs[-1], temb, train)
            if self.progressive_input == "input_skip":
                input_pyramid = Downsample(with_conv=False, **resample)(input_pyramid)
                h = Combine(self.progressive_combine, dtype=dtype)(input_pyramid, h)
            elif self.progressive_input == "residual":
                input_pyramid = Downsample(h.shape[-1], with_conv=True, **resample)(input_pyramid)
                input_pyramid = h = residual_sum(input_pyramid, h, self.skip_rescale)
            hs.append(h)

        # -- bottleneck ---------------------------------------------------------------------
        h = hs[-1]
        h = self._resblock()(h, temb, train)
        h = self._attn()(h)
        h = self._resblock()(h, temb, train)

        # -- decoder ------------------------------------------------------------------------
        pyramid = None
        for level in reversed(range(n_levels)):
            for _ in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = self._resblock(nf * self.ch_mult[level])(h, temb, train)
            if h.shape[1] in self.attn_resolutions:
                h = self._attn()(h)

            if self.progressive == "output_skip":
                # Each resolution predicts an output; coarser predictions are upsampled and added.
                out = conv3x3(channels, init_scale=self.init_scale, dtype=dtype)(act(group_norm(h.shape[-1])(h)))
                if pyramid is not None:
                    out = out + Upsample(with_conv=False, **resample)(pyramid)
                pyramid = out
            elif self.progressive == "residual":
                if pyramid is None:
                    pyramid = conv3x3(h.shape[-1], dtype=dtype)(act(group_norm(h.shape[-1])(h)))
                else:
                    pyramid = Upsample(h.shape[-1], with_conv=True, **resample)(pyramid)
                    pyramid = h = residual_sum(pyramid, h, self.skip_rescale)

            if level != 0:
                if self.resblock_type == "ddpm":
                    h = Upsample(with_conv=self.resamp_with_conv, **resample)(h)
                else:
                    h = self._resblock(up=True)(h, temb, train)
        assert not hs

        if self.progressive == "output_skip":
            return pyramid.astype(jnp.float32)
        h = act(group_norm(h.shape[-1])(h))
        return conv3x3(channels, init_scale=self.init_scale, name="conv_out", dtype=dtype)(h).astype(jnp.float32)


class DDPMpp(NCSNpp):
    """DDPM++ U-Net score network (Song et al., ICLR 2021, Appendix H.1).

    The same architecture as :class:`NCSNpp` with the defaults of the paper's CIFAR-10 DDPM++
    (continuous, VP) model: positional embedding, no FIR, no progressive input or output, BigGAN
    blocks with rescaled skips. ``num_res_blocks=8`` gives DDPM++ deep, and
    ``resblock_type='ddpm', skip_rescale=False, num_res_blocks=2`` the DDPM network of Ho et al. (2020).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = DDPMpp(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
        >>> x, t = jnp.zeros((2, 8, 8, 1)), jnp.full((2,), 999 * 0.5)
        >>> variables = model.init(jax.random.key(0), x, t)
        >>> model.apply(variables, x, t).shape
        (2, 8, 8, 1)
    """

    fir: bool = False
    progressive_input: str = "none"
    embedding_type: str = "positional"
