"""Score networks: NCSN++ and DDPM++ (Song et al., ICLR 2021), and an MLP for low-dimensional data.

All three are Flax Linen modules with one calling convention::

    out = model.apply(variables, x, noise_cond, y=None, train=False, rngs={"dropout": key})

``noise_cond`` (shape ``(batch,)``) is embedded as given; ``y`` holds integer labels for
class-conditional models (label ``num_classes`` is the null class); the output has the shape of
``x`` and its meaning (score, noise, denoised data) is fixed by the parameterization around it.
Parameter counts of the paper's CIFAR-10 networks are in ``PARAMS.md``.

Every network (the classifier below too) takes ``dtype='float32'`` (default) or ``'bfloat16'``: mixed
precision, with convolutions, dense layers, attention products and FIR resampling computed in bfloat16 from
float32 parameters, and the noise-level embedding, group normalisation, softmax and output in float32. The
parameter tree is the same for both, so parameters trained in one dtype are used as they are in the other.

Beside them, the noise-conditional classifier of classifier guidance, :class:`NoiseConditionalClassifier`
(``model.apply(variables, x, noise_cond) -> logits``), with its loss, a training loop and
:func:`make_classifier_log_prob_fn`, which turns it into the ``log_prob_y_fn(x, t)`` that
:func:`jaxdiff.guidance.classifier_guided_score_fn` takes.
"""

from jaxdiff.models._classifier import (
    NoiseConditionalClassifier,
    make_classifier_apply,
    make_classifier_log_prob_fn,
    noise_conditional_classifier_loss,
    train_classifier,
)
from jaxdiff.models._mlp import MLP
from jaxdiff.models._ncsnpp import DDPMpp, NCSNpp
from jaxdiff.models._registry import MODELS, get_model

__all__ = [
    "NCSNpp",
    "DDPMpp",
    "MLP",
    "get_model",
    "MODELS",
    "NoiseConditionalClassifier",
    "make_classifier_apply",
    "make_classifier_log_prob_fn",
    "noise_conditional_classifier_loss",
    "train_classifier",
]
