"""Readers for formats made elsewhere, translated into jaxdiff's own models, SDEs and configs.

* :mod:`jaxdiff.compat.score_sde`: the checkpoints and configs of the reference implementation of Song et
  al., ICLR 2021 (``yang-song/score_sde``), e.g. its published CIFAR-10 NCSN++ and DDPM++ models.

Nothing else in jaxdiff imports this package; import the submodule you need::

    from jaxdiff.compat import score_sde
    ckpt = score_sde.load_checkpoint("checkpoint_26", "configs/ve/cifar10_ncsnpp_continuous.py")
"""

import importlib

__all__ = ["score_sde"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"jaxdiff.compat.{name}")
    raise AttributeError(f"module 'jaxdiff.compat' has no attribute {name!r}")
