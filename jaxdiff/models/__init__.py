"""Score networks: NCSN++, DDPM++ (Song et al., ICLR 2021) and an MLP for low-dimensional data."""

from jaxdiff.models._ncsnpp import DDPMpp, NCSNpp

__all__ = ["NCSNpp", "DDPMpp"]
