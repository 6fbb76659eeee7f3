"""Score networks: NCSN++ and DDPM++ (Song et al., ICLR 2021), and an MLP for low-dimensional data.

All three are Flax Linen modules with one calling convention::

    out = model.apply(variables, x, noise_cond, y=None, train=False, rngs={"dropout": key})

``noise_cond`` (shape ``(batch,)``) is embedded as given; ``y`` holds integer labels for
class-conditional models (label ``num_classes`` is the null class); the output has the shape of
``x`` and its meaning (score, noise, denoised data) is fixed by the parameterization around it.
Parameter counts of the paper's CIFAR-10 networks are in ``PARAMS.md``.
"""

from jaxdiff.models._mlp import MLP
from jaxdiff.models._ncsnpp import DDPMpp, NCSNpp
from jaxdiff.models._registry import MODELS, get_model

__all__ = ["NCSNpp", "DDPMpp", "MLP", "get_model", "MODELS"]
