"""Sample-quality metrics: Fréchet distance (FID), kernel distance (KID) and a classifier score.

Each metric compares two sets of features, ``(n, F)`` arrays from a :class:`FeatureExtractor`:

* **Fréchet distance** (Heusel et al., 2017) between Gaussians fitted to the two sets,

      d^2 = |mu_1 - mu_2|^2 + tr(C_1) + tr(C_2) - 2 tr((C_1^{1/2} C_2 C_1^{1/2})^{1/2}).

  The last trace is the nuclear norm of ``C_1^{1/2} C_2^{1/2}`` (its singular values are the square roots
  of the eigenvalues of ``C_1^{1/2} C_2 C_1^{1/2}``), so it is computed from two symmetric eigendecompositions
  and one SVD, in float64. Unlike ``scipy.linalg.sqrtm(C_1 @ C_2)`` of the non-symmetric product, this stays
  real and finite for singular or badly scaled covariances (fewer samples than features, dead features).
* **Kernel inception distance** (Binkowski et al., 2018): the unbiased estimate of the squared MMD with
  the cubic polynomial kernel ``k(x, y) = (x.y / F + 1)^3``, averaged over random subsets.
* **Classifier score**: ``exp E_x KL(p(y|x) || p(y))``, the Inception Score (Salimans et al., 2016) with
  the library's digits classifier in place of Inception, and the histogram of predicted classes.

The metrics run on the host in float64 (numpy and scipy); the feature extractors run in JAX. For the
embedded 8x8 digits, :func:`digits_classifier` trains a small MLP in seconds on a CPU and serves its
penultimate layer as the features; for CIFAR-10 FID, wrap a pretrained InceptionV3 with
:func:`inception_features_from_fn` (jaxdiff cannot download the weights).

>>> clf = digits_classifier(seed=0)
>>> test = get_dataset("digits", split="test", batch_size=300, seed=0).batch(0)
>>> scores = evaluate_samples(samples, test["x"], clf)
>>> scores["fid"], scores["kid_mean"], scores["classifier_score"]
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.special
from flax import serialization
from jaxtyping import Array, Float, Int

from jaxdiff.data import get_dataset

__all__ = [
    "Classifier",
    "DigitsClassifier",
    "FeatureExtractor",
    "NotPSDWarning",
    "classifier_score",
    "digits_classifier",
    "evaluate_samples",
    "frechet_distance",
    "frechet_distance_from_stats",
    "get_feature_extractor",
    "inception_features_from_fn",
    "kernel_inception_distance",
    "kid_subset_rows",
]

PyTree = Any


# -- Fréchet distance ------------------------------------------------------------------------------


class NotPSDWarning(RuntimeWarning):
    """A covariance had a negative eigenvalue beyond rounding error; it was clipped to zero."""


def _psd_sqrt(cov: np.ndarray, psd_rtol: float, name: str) -> np.ndarray:
    """Symmetric square root of a PSD matrix from its eigendecomposition, negative eigenvalues clipped.

    Eigenvalues in ``[-psd_rtol * max|lambda|, 0)`` are rounding error and are clipped silently; more
    negative ones mean the input was not a covariance and are reported with a :class:`NotPSDWarning`.
    """
    cov = 0.5 * (cov + cov.T)  # exact symmetry for eigh
    lam, vecs = np.linalg.eigh(cov)
    scale = max(float(np.max(np.abs(lam))), np.finfo(np.float64).tiny)
    if lam[0] < -psd_rtol * scale:
        warnings.warn(
            f"{name} is not positive semi-definite: eigenvalue {lam[0]:.3g} (largest {scale:.3g}); "
            f"{int(np.sum(lam < 0))} negative eigenvalue(s) clipped to 0",
            NotPSDWarning,
            stacklevel=3,
        )
    return (vecs * np.sqrt(np.clip(lam, 0.0, None))) @ vecs.T


def frechet_distance_from_stats(
    mu1: Float[Array, " F"] | np.ndarray,
    cov1: Float[Array, "F F"] | np.ndarray,
    mu2: Float[Array, " F"] | np.ndarray,
    cov2: Float[Array, "F F"] | np.ndarray,
    *,
    psd_rtol: float = 1e-8,
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``.

    ``d^2 = |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1^{1/2} cov2 cov1^{1/2})^{1/2})`` (Dowson and
    Landau, 1982; the FID of Heusel et al., 2017). The cross term is ``2 ||cov1^{1/2} cov2^{1/2}||_*``, the
    nuclear norm, since the singular values of ``S1 S2`` are the square roots of the eigenvalues of
    ``S1 S2 S2 S1 = S1 cov2 S1``. Both square roots come from ``eigh`` of a symmetric matrix, so singular
    covariances (rank below ``F``) give a finite, real and accurate answer.

    Args:
      mu1: mean of the first Gaussian.
      cov1: its covariance, symmetric positive semi-definite.
      mu2: mean of the second Gaussian.
      cov2: its covariance.
      psd_rtol: negative eigenvalues of a covariance smaller in size than ``psd_rtol`` times its largest
        eigenvalue are rounding error and clipped silently; larger ones are clipped with a
        :class:`NotPSDWarning`.

    Returns:
      The squared distance as a Python float (never negative; rounding below zero is clipped).

    >>> frechet_distance_from_stats(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))
    4.0
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of one length, got shapes {mu1.shape} and {mu2.shape}")
    f = mu1.shape[0]
    if cov1.shape != (f, f) or cov2.shape != (f, f):
        raise ValueError(f"covariances must be ({f}, {f}), got {cov1.shape} and {cov2.shape}")
    s1 = _psd_sqrt(cov1, psd_rtol, "cov1")
    s2 = _psd_sqrt(cov2, psd_rtol, "cov2")
    cross = np.sum(np.linalg.svd(s1 @ s2, compute_uv=False))  # tr (S1 C2 S1)^{1/2}
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * cross
    return float(max(d2, 0.0))


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (n, features), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {feats.shape[0]}")
    return feats.mean(0), np.cov(feats, rowvar=False, ddof=1).reshape(feats.shape[1], feats.shape[1])


def frechet_distance(
    feats_a: Float[Array, "n F"] | np.ndarray, feats_b: Float[Array, "m F"] | np.ndarray, *, psd_rtol: float = 1e-8
) -> float:
    """Fréchet distance (FID when the features are Inception's) between two feature sets.

    Gaussians are fitted with the sample mean and the unbiased (``n - 1``) covariance, then compared by
    :func:`frechet_distance_from_stats`. Fewer samples than features is fine (the covariances are
    singular); the estimate is biased upwards for small ``n``, so compare FIDs at equal sample sizes.

    Args:
      feats_a: ``(n, F)`` features of the first set (e.g. samples).
      feats_b: ``(m, F)`` features of the second set (e.g. test data).
      psd_rtol: see :func:`frechet_distance_from_stats`.

    Returns:
      The squared Fréchet distance, a Python float.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_stats(*_stats(a), *_stats(b), psd_rtol=psd_rtol)


# -- kernel inception distance ---------------------------------------------------------------------


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3  # k(x, y) = (x.y / d + 1)^3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al., 2012, eq. 3): the diagonals of k(x, x) and k(y, y) left out."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    term_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * kxy.mean())


def kernel_inception_distance(
    feats_a: Float[Array, "n F"] | np.ndarray,
    feats_b: Float[Array, "m F"] | np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Binkowski et al., 2018): unbiased MMD^2 with the kernel ``(x.y / F + 1)^3``, over subsets.

    Each of ``num_subsets`` rounds draws ``subset_size`` rows of each set without replacement (the seed
    fixes the draws) and computes the unbiased MMD^2 estimate; the estimate is unbiased for any size, so
    KID can be compared across sample sizes, and it can be slightly negative when the sets match.
    By default the subsets are smaller than the sets (1000 rows, at most half the smaller set;
    :func:`kid_subset_rows`): a subset as large as a set is that whole set every time, and the spread
    over subsets then says nothing.

    Args:
      feats_a: ``(n, F)`` features of the first set.
      feats_b: ``(m, F)`` features of the second set.
      num_subsets: number of subsets averaged.
      subset_size: rows per subset, reduced to ``min(n, m)`` if larger (at least 2); ``None`` (default):
        :func:`kid_subset_rows`.
      seed: seed of the subset draws.

    Returns:
      ``(mean, std)`` of the per-subset estimates (``std`` with ``ddof=0``; zero for one subset).
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    size = kid_subset_rows(a.shape[0], b.shape[0], subset_size)
    if size < 2:
        raise ValueError(
            f"KID needs subsets of at least 2 rows; got subset_size={subset_size}, n={a.shape[0]}, m={b.shape[0]}"
        )
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for i in range(num_subsets):
        rows_a = rng.choice(a.shape[0], size, replace=False)
        rows_b = rng.choice(b.shape[0], size, replace=False)
        estimates[i] = _mmd2_unbiased(a[rows_a], b[rows_b])
    return float(estimates.mean()), float(estimates.std())


def kid_subset_rows(n: int, m: int, subset_size: int | None = None) -> int:
    """Rows per KID subset of sets of ``n`` and ``m`` rows.

    ``subset_size`` if given (capped at the smaller set); by default 1000, at most half the smaller set, so
    that the subsets differ and their spread means something.
    """
    if subset_size is not None:
        return min(int(subset_size), n, m)
    return min(1000, max(2, min(n, m) // 2), n, m)


# -- classifier score --------------------------------------------------------------------------------


def classifier_score(logits: Float[Array, "n K"] | np.ndarray) -> dict[str, Any]:
    """Inception-Score-like statistics of a classifier's logits on a set of samples.

    Args:
      logits: ``(n, K)`` unnormalised log-probabilities ``log p(y|x)``.

    Returns:
      A dict with ``classifier_score = exp(E_x KL(p(y|x) || p(y)))`` where ``p(y) = E_x p(y|x)`` (between
      1 and ``K``; high when samples are confidently classified and the classes are balanced),
      ``class_histogram`` (fraction of samples predicted as each class, by argmax) and ``class_entropy``
      (its entropy in nats; ``log K`` when balanced).
    """
    logits = _as_features(logits, "logits")
    n, k = logits.shape
    logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)  # log p(y|x)
    log_marginal = scipy.special.logsumexp(logp, axis=0) - np.log(n)  # log p(y)
    kl = np.sum(np.exp(logp) * (logp - log_marginal), axis=1)
    hist = np.bincount(np.argmax(logits, axis=1), minlength=k) / n
    nz = hist[hist > 0]
    return {
        "classifier_score": float(np.exp(kl.mean())),
        "class_histogram": [float(h) for h in hist],
        "class_entropy": float(-np.sum(nz * np.log(nz))),
    }


# -- feature extractors ------------------------------------------------------------------------------


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that maps a batch of images ``(B, H, W, C)`` in ``[-1, 1]`` to features ``(B, F)``."""

    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B F"]: ...


@runtime_checkable
class Classifier(FeatureExtractor, Protocol):
    """A feature extractor that also gives class logits; :func:`evaluate_samples` then adds the
    classifier score."""

    def logits(self, x: Float[Array, "B H W C"]) -> Float[Array, "B K"]: ...


@dataclasses.dataclass(frozen=True)
class InceptionFeatures:
    """A :class:`FeatureExtractor` around a user-supplied Inception network (see
    :func:`inception_features_from_fn`)."""

    apply_fn: Callable[[Array], Array]
    image_size: int = 299
    input_range: tuple[float, float] = (-1.0, 1.0)

    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B F"]:
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"expected images (B, H, W, 1 or 3), got shape {x.shape}")
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        s = self.image_size
        x = jax.image.resize(x, (x.shape[0], s, s, 3), method="bilinear")
        lo, hi = self.input_range
        x = lo + (jnp.clip(x, -1.0, 1.0) + 1.0) * (0.5 * (hi - lo))
        feats = jnp.asarray(self.apply_fn(x))
        return feats.reshape(feats.shape[0], -1)


def inception_features_from_fn(
    apply_fn: Callable[[Array], Array], *, image_size: int = 299, input_range: tuple[float, float] = (-1.0, 1.0)
) -> InceptionFeatures:
    """Wraps a pretrained InceptionV3 as a :class:`FeatureExtractor`, for CIFAR-10 FID and KID.

    jaxdiff bundles no Inception weights and downloads nothing; load a network yourself (e.g. the
    ``pool_3`` layer of the TF-slim or pytorch-fid InceptionV3 ported to JAX) and pass its forward
    function. Images in ``[-1, 1]`` (one or three channels) are resized bilinearly to ``image_size`` and
    mapped to ``input_range`` before ``apply_fn``. FIDs are comparable with published ones only with the
    same network and weights.

    Args:
      apply_fn: ``images (B, image_size, image_size, 3) -> features (B, 2048)`` (or any ``(B, ...)``,
        flattened); jit it yourself if it is a JAX function.
      image_size: the network's input size.
      input_range: the value range the network expects.

    Returns:
      The feature extractor.

    >>> extractor = inception_features_from_fn(lambda x: inception.apply(variables, x))
    >>> scores = evaluate_samples(samples, cifar_test_images, extractor)
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    return InceptionFeatures(apply_fn, int(image_size), tuple(map(float, input_range)))


def get_feature_extractor(name: str, **kwargs) -> FeatureExtractor:
    """Resolves a feature extractor by name, for experiment scripts.

    Args:
      name: ``"digits"`` (:func:`digits_classifier`, the default for the 8x8 digits) or ``"inception"``
        (:func:`inception_features_from_fn`; needs ``apply_fn=``).
      **kwargs: passed to the constructor.

    Raises:
      ValueError: for an unknown name, or ``"inception"`` without ``apply_fn`` (jaxdiff cannot download
        Inception weights).
    """
    if name == "digits":
        return digits_classifier(**kwargs)
    if name == "inception":
        if kwargs.get("apply_fn") is None:
            raise ValueError(
                "the 'inception' feature extractor needs pretrained InceptionV3 weights, which jaxdiff does not "
                "bundle and cannot download: load them yourself and pass apply_fn=<images -> pool_3 features> "
                "(see jaxdiff.metrics.inception_features_from_fn)"
            )
        return inception_features_from_fn(**kwargs)
    raise ValueError(f"unknown feature extractor {name!r}; valid: 'digits', 'inception'")


# -- the digits classifier ---------------------------------------------------------------------------


class DigitsMLP(nn.Module):
    """A small MLP for 8x8 digits: 64 pixels -> 256 -> 64 (the features) -> 10 logits, ReLU between."""

    hidden: int = 256
    features: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
        feats = nn.relu(nn.Dense(self.features)(h))
        return nn.Dense(self.num_classes)(feats), feats


_NET = DigitsMLP()
_forward = jax.jit(_NET.apply)
_BATCH, _LEARNING_RATE = 128, 3e-3
_CACHE_VERSION = 1  # bump when the architecture or the training recipe changes


def _as_images(x) -> Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 2 and x.shape[1] == 64:
        x = x.reshape(-1, 8, 8, 1)
    if x.ndim != 4 or x.shape[1:] != (8, 8, 1):
        raise ValueError(f"expected digits (B, 8, 8, 1) in [-1, 1], got shape {x.shape}")
    return x


@dataclasses.dataclass(frozen=True)
class DigitsClassifier:
    """The trained digits MLP; a :class:`Classifier` (and so a :class:`FeatureExtractor`).

    Attributes:
      params: the network's variables.
      seed: the training seed.
      steps: optimiser steps taken.
      train_seconds: wall time of training (``None`` when loaded from the cache).
    """

    params: PyTree
    seed: int
    steps: int
    train_seconds: float | None = None

    def __call__(self, x: Float[Array, "B 8 8 1"]) -> Float[Array, "B 64"]:
        return self.features(x)

    def features(self, x: Float[Array, "B 8 8 1"]) -> Float[Array, "B 64"]:
        """Penultimate-layer activations (64 per image) of images in ``[-1, 1]``."""
        return _forward(self.params, _as_images(x))[1]

    def logits(self, x: Float[Array, "B 8 8 1"]) -> Float[Array, "B 10"]:
        """Class logits."""
        return _forward(self.params, _as_images(x))[0]

    def predict(self, x: Float[Array, "B 8 8 1"]) -> Int[Array, " B"]:
        """Predicted classes."""
        return jnp.argmax(self.logits(x), axis=-1)

    def accuracy(self, x: Float[Array, "B 8 8 1"], labels: Int[Array, " B"]) -> float:
        """Fraction of ``x`` classified as ``labels``."""
        return float(jnp.mean(self.predict(x) == jnp.asarray(labels)))


def _full_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """All examples of a digits split, centred to ``[-1, 1]``, in a fixed order."""
    kwargs = dict(split=split, seed=0, shuffle=False, process_index=0, process_count=1)
    n = get_dataset("digits", batch_size=1, **kwargs).info.num_examples
    batch = get_dataset("digits", batch_size=n, **kwargs).batch(0)
    return batch["x"], batch["label"]


@jax.jit
def _train(key, x, labels, steps, learning_rate):
    """Adam with a cosine decay on the cross-entropy; batch ``i`` drawn from ``fold_in(key, i)``.

    The loop is a ``fori_loop`` with a traced trip count, so one compilation serves every ``steps``.
    """
    init_key, data_key = jax.random.split(key)
    params = _NET.init(init_key, x[:1])
    tx = optax.scale_by_adam()

    def loss_fn(params, xb, yb):
        logits, _ = _NET.apply(params, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def step(i, carry):
        params, opt_state = carry
        k_idx, k_noise = jax.random.split(jax.random.fold_in(data_key, i))
        idx = jax.random.randint(k_idx, (_BATCH,), 0, x.shape[0])
        # Half a quantisation level of uniform noise (levels are 2/16 apart in [-1, 1]), so the features
        # vary smoothly over the continuous values a generative model produces.
        xb = x[idx] + jax.random.uniform(k_noise, x[idx].shape, minval=-1.0 / 16, maxval=1.0 / 16)
        grads = jax.grad(loss_fn)(params, xb, labels[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        lr = learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * i / steps))  # cosine decay to 0
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, opt_state

    params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
    return params


def digits_classifier(seed: int = 0, steps: int = 1500, cache_dir: str | os.PathLike | None = None) -> DigitsClassifier:
    """Trains (or loads from ``cache_dir``) the small MLP used as the feature extractor for the digits.

    The network (:class:`DigitsMLP`, 34k parameters) is trained on the digits *train* split (1497 images)
    with Adam and a cosine learning-rate decay, batch 128, uniform noise of half a quantisation level as
    augmentation; all randomness comes from ``seed``, so retraining gives bitwise the same parameters
    on a CPU. The default 1500 steps take a few seconds on a CPU and give about 98% accuracy on the
    test split.

    Args:
      seed: the training seed.
      steps: optimiser steps.
      cache_dir: if given, the parameters are read from (or, after training, written to)
        ``cache_dir/digits_mlp_v{version}_seed{seed}_steps{steps}.msgpack``.

    Returns:
      The :class:`DigitsClassifier`.

    >>> clf = digits_classifier(seed=0)
    >>> test = get_dataset("digits", split="test", batch_size=300, seed=0).batch(0)
    >>> clf.accuracy(test["x"], test["label"]) > 0.95
    True
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    path = None
    template = jax.eval_shape(_NET.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    if cache_dir is not None:
        path = os.path.join(os.fspath(cache_dir), f"digits_mlp_v{_CACHE_VERSION}_seed{seed}_steps{steps}.msgpack")
        if os.path.exists(path):
            with open(path, "rb") as f:
                target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
                params = serialization.from_bytes(target, f.read())
            return DigitsClassifier(jax.tree.map(jnp.asarray, params), seed, steps)
    x, labels = _full_split("train")
    t0 = time.perf_counter()
    params = _train(jax.random.key(seed), jnp.asarray(x), jnp.asarray(labels), steps, _LEARNING_RATE)
    params = jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(serialization.to_bytes(jax.device_get(params)))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return DigitsClassifier(params, seed, steps, seconds)


# -- everything at once --------------------------------------------------------------------------------


def _batched(fn: Callable[[Array], Array], x: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over ``x`` in batches of one shape (the last padded), so a jitted ``fn`` compiles once."""
    n = x.shape[0]
    out = []
    for start in range(0, n, batch_size):
        chunk = x[start : start + batch_size]
        pad = batch_size - chunk.shape[0] if n > batch_size else 0
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(np.asarray(fn(chunk))[: chunk.shape[0] - pad])
    return np.concatenate(out)


def evaluate_samples(
    samples: Float[Array, "n H W C"] | np.ndarray,
    reference: Float[Array, "m H W C"] | np.ndarray,
    extractor: FeatureExtractor,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int | None = None,
    seed: int = 0,
    batch_size: int = 500,
) -> dict[str, Any]:
    """FID, KID and (for a :class:`Classifier`) the classifier score of samples against reference data.

    Args:
      samples: generated images in ``[-1, 1]``.
      reference: reference images (e.g. the test split) in ``[-1, 1]``.
      extractor: a :class:`FeatureExtractor`, e.g. :func:`digits_classifier` or
        :func:`inception_features_from_fn`.
      kid_subsets: subsets averaged by :func:`kernel_inception_distance`.
      kid_subset_size: rows per KID subset (default: :func:`kid_subset_rows`, smaller than both sets).
      seed: seed of the KID subsets.
      batch_size: images per call of the extractor.

    Returns:
      A dict of Python numbers: ``fid``, ``kid_mean``, ``kid_std``, ``num_samples``, ``num_reference``,
      ``kid_subset_size``, ``feature_dim``; with a classifier also ``classifier_score``, ``class_histogram``,
      ``class_entropy`` of the samples and ``reference_classifier_score`` of the reference set (the value to aim for).
    """
    samples, reference = np.asarray(samples, np.float32), np.asarray(reference, np.float32)
    fa = _batched(extractor, samples, batch_size)
    fb = _batched(extractor, reference, batch_size)
    kid_mean, kid_std = kernel_inception_distance(
        fa, fb, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )
    out: dict[str, Any] = {
        "fid": frechet_distance(fa, fb),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "num_samples": int(samples.shape[0]),
        "num_reference": int(reference.shape[0]),
        "kid_subset_size": kid_subset_rows(fa.shape[0], fb.shape[0], kid_subset_size),
        "feature_dim": int(fa.shape[1]),
    }
    if isinstance(extractor, Classifier):
        out.update(classifier_score(_batched(extractor.logits, samples, batch_size)))
        ref = classifier_score(_batched(extractor.logits, reference, batch_size))
        out["reference_classifier_score"] = ref["classifier_score"]
    return out
