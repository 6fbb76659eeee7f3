"""A time-conditional MLP score network for low-dimensional data (toy 2-D sets, small vectors).

Same calling convention as the U-Nets: ``model.apply(variables, x, noise_cond, y=None,
train=False)`` with ``x`` of shape ``(batch, d)``; ``noise_cond`` is embedded as given and the
output, shaped like ``x``, is interpreted by the parameterization that wraps the network.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models._checks import check_choice, check_dtype, check_labels, check_noise_cond
from jaxdiff.models._embedding import EMBEDDING_TYPES, embed_noise

Array = jax.Array

__all__ = ["MLP"]


class MLP(nn.Module):
    """Residual-free MLP with a per-layer additive embedding of the noise level (and label).

    The noise level is embedded (Fourier or positional, as in the U-Nets), passed through a small
    SiLU MLP, and projected into every hidden layer as a bias: ``h <- silu(W h + b + V temb)``.

    Attributes:
        hidden_sizes: widths of the hidden layers.
        embedding_size: size of the noise-level (and label) embedding.
        embedding_type: ``'fourier'`` or ``'positional'``.
        fourier_scale: standard deviation of the Gaussian Fourier frequencies.
        dropout: dropout rate after each hidden layer, active only with ``train=True``.
        conditional: condition on the noise level.
        num_classes: if set, class-conditional with a ``num_classes + 1``-row label embedding; label
            ``num_classes`` is the null class of classifier-free guidance.
        dtype: compute dtype of the dense layers, ``'float32'`` or ``'bfloat16'``; the parameters,
            the noise-level embedding and the output are float32 either way.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = MLP(hidden_sizes=(32, 32))
        >>> x, s = jnp.zeros((4, 2)), jnp.zeros((4,))
        >>> variables = model.init(jax.random.key(0), x, s)
        >>> model.apply(variables, x, s).shape
        (4, 2)
    """

    hidden_sizes: tuple[int, ...] = (256, 256, 256)
    embedding_size: int = 64
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0
    dropout: float = 0.0
    conditional: bool = True
    num_classes: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        object.__setattr__(
            self,
            "embedding_type",
            check_choice("embedding_type", self.embedding_type, EMBEDDING_TYPES),
        )
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be positive widths, got {self.hidden_sizes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int or None, got {self.num_classes}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, noise_cond: Array, y: Array | None = None, train: bool = False) -> Array:
        """Evaluates the network.

        Args:
            x: data of shape ``(batch, d)``.
            noise_cond: noise-level input of shape ``(batch,)``, embedded as given.
            y: integer labels of shape ``(batch,)``, only for a class-conditional model.
            train: enables dropout (needs an rng named ``'dropout'``).

        Returns:
            An array of shape ``(batch, d)``, float32 whatever the compute dtype.
        """
        if jnp.ndim(x) != 2:
            raise ValueError(f"x must have shape (batch, d), got {jnp.shape(x)}")
        dense_in = self.variables.get("params", {}).get("dense_in")
        if dense_in is not None and dense_in["kernel"].shape[0] != x.shape[-1]:
            raise ValueError(f"the model was initialised for d={dense_in['kernel'].shape[0]}, got x of shape {x.shape}")
        check_noise_cond(noise_cond, x.shape[0])
        check_labels(y, self.num_classes, x.shape[0])
        # The noise level is embedded in at least float32, whatever the data's or the compute dtype.
        dtype = jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        noise_cond = jnp.asarray(noise_cond, dtype)

        size = self.embedding_size
        # Dense layers compute in the compute dtype from float32 parameters.
        mixed = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.float32)
        temb = None
        if self.conditional:
            emb = embed_noise(noise_cond, self.embedding_type, size, self.fourier_scale)
            temb = nn.Dense(4 * size, name="temb_dense_0", **mixed)(emb)
            temb = nn.Dense(size, name="temb_dense_1", **mixed)(nn.silu(temb))
        if self.num_classes is not None:
            label = nn.Embed(self.num_classes + 1, size, name="label_embed", **mixed)(y)
            temb = label if temb is None else temb + label

        h = x
        for i, width in enumerate(self.hidden_sizes):
            h = nn.Dense(width, name="dense_in" if i == 0 else f"dense_{i}", **mixed)(h)
            if temb is not None:
                h = h + nn.Dense(width, name=f"temb_proj_{i}", **mixed)(nn.silu(temb))
            h = nn.silu(h)
            h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return nn.Dense(x.shape[-1], name="dense_out", **mixed)(h).astype(jnp.float32)
