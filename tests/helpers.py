"""Shared test helpers: checks of samples against an exact Gaussian mixture; a damaged checkpoint."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from jaxdiff.oracle import GaussianMixture


def four_component_mixture() -> GaussianMixture:
    """2-D mixture of 4 well-separated components with unequal weights 0.1, 0.2, 0.3, 0.4."""
    return GaussianMixture.grid(n_per_side=2, spacing=4.0, std=0.5)


def component_masses(mixture: GaussianMixture, x) -> np.ndarray:
    """Fraction of samples whose most likely component (at t=0) is each component."""
    labels = np.asarray(mixture.responsibilities(jnp.asarray(x)).argmax(-1))
    return np.bincount(labels, minlength=mixture.num_components) / len(labels)


def assert_matches_mixture(mixture: GaussianMixture, x, *, mass_atol=0.02, n_se=5.0) -> None:
    """Per-component mass within ``mass_atol`` of the weights; mean and covariance within ``n_se``
    Monte-Carlo standard errors of the mixture's exact moments.

    The standard errors are those of the sample mean and sample covariance of ``len(x)`` exact draws,
    computed from the exact fourth moments of a large exact sample.
    """
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x)), "samples contain NaN or inf"
    n = x.shape[0]
    np.testing.assert_allclose(component_masses(mixture, x), np.asarray(mixture.weights), atol=mass_atol)

    mean = np.asarray(mixture.mean(), np.float64)
    cov = np.asarray(mixture.covariance(), np.float64)
    se_mean = np.sqrt(np.diag(cov) / n)
    np.testing.assert_allclose(x.mean(0), mean, atol=n_se * se_mean.max(), rtol=0)

    import jax

    ref = np.asarray(mixture.sample(jax.random.key(12345), 200_000), np.float64)
    c = ref - mean
    prods = c[:, :, None] * c[:, None, :]
    se_cov = np.sqrt(prods.var(0) / n)
    sample_cov = np.cov(x.T)
    diff = np.abs(sample_cov - cov)
    assert np.all(diff <= n_se * se_cov), f"covariance {sample_cov} vs exact {cov} (se {se_cov})"


def corrupt_checkpoint(step_dir) -> None:
    """Truncates every data file of a checkpoint's state (what a torn write or a bad disk leaves)."""
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            path = os.path.join(root, f)
            if os.path.getsize(path) > 0:
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 3)
