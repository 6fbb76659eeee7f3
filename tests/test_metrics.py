"""Tests of jaxdiff.metrics: Fréchet distance, KID, classifier score, the digits classifier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxdiff import metrics as M

FAST_STEPS = 300  # enough for > 90% test accuracy; the default (1500) is checked in a slow test


def _naive_trace_sqrt(cov1, cov2):
    """tr sqrtm(C1 C2) of the non-symmetric product, as in the common FID code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.trace(scipy.linalg.sqrtm(cov1 @ cov2))


def _naive_frechet(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.real(_naive_trace_sqrt(c1, c2))


# -- Fréchet distance ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_matches_scipy_sqrtm_on_well_conditioned_features(seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((400, 8)) @ rng.standard_normal((8, 8))
    b = 0.5 + rng.standard_normal((300, 8)) @ rng.standard_normal((8, 8))
    np.testing.assert_allclose(M.frechet_distance(a, b), _naive_frechet(a, b), rtol=1e-9, atol=0)


def test_frechet_of_identical_sets_is_zero():
    a = np.random.default_rng(0).standard_normal((200, 16))
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-10)
    assert M.frechet_distance(jnp.asarray(a, jnp.float32), jnp.asarray(a, jnp.float32)) == pytest.approx(0.0, abs=1e-6)


def test_frechet_closed_forms():
    # Docstring case: |1|^2 * 2 + tr(I) + tr(4I) - 2 tr(2I) = 2 + 2 + 8 - 8.
    assert M.frechet_distance_from_stats(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2)) == pytest.approx(4.0)
    # Commuting (diagonal) covariances: |dm|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    va, vb, mu1, mu2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5), rng.normal(size=5), rng.normal(size=5)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    got = M.frechet_distance_from_stats(mu1, np.diag(va), mu2, np.diag(vb))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    # C1 = I against a rotated C2 = Q diag(l) Q^T: tr(C2^{1/2}) = sum sqrt(l).
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    lam = rng.uniform(0.01, 10, 6)
    want = 6 + lam.sum() - 2 * np.sqrt(lam).sum()
    got = M.frechet_distance_from_stats(np.zeros(6), np.eye(6), np.zeros(6), (q * lam) @ q.T)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_frechet_rank_deficient_is_finite_and_exact_where_naive_sqrtm_fails():
    # C1 = A A^T, C2 = B B^T of rank 10 in 64 dimensions, scales spanning six decades. Exactly,
    # tr (C1^{1/2} C2 C1^{1/2})^{1/2} = sum of the singular values of A^T B.
    rng = np.random.default_rng(0)
    d, k = 64, 10
    a = rng.standard_normal((d, k)) * np.logspace(0, 6, k)
    b = rng.standard_normal((d, k))
    b[:, : k // 2] = 0.5 * a[:, : k // 2]
    cov1, cov2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum(a**2) + np.sum(b**2) - 2 * np.linalg.svd(a.T @ b, compute_uv=False).sum()

    naive = _naive_trace_sqrt(cov1, cov2)
    assert not np.isfinite(naive) or abs(np.imag(naive)) > 1e-3  # the naive method's complex noise

    got = M.frechet_distance_from_stats(mu1, cov1, mu2, cov2)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, exact, rtol=1e-7)


def test_frechet_fewer_samples_than_features():
    # 12 samples in 48 dimensions: singular sample covariances C = X_c^T X_c / (n - 1).
    rng = np.random.default_rng(1)
    fa, fb = rng.standard_normal((12, 48)), 0.3 + 2 * rng.standard_normal((12, 48))
    ca, cb = (fa - fa.mean(0)) / np.sqrt(11), (fb - fb.mean(0)) / np.sqrt(11)
    exact = (
        np.sum((fa.mean(0) - fb.mean(0)) ** 2)
        + np.sum(ca**2)
        + np.sum(cb**2)
        - 2 * np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    )
    np.testing.assert_allclose(M.frechet_distance(fa, fb), exact, rtol=1e-9)


def test_frechet_clips_rounding_and_warns_on_indefinite_covariance():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    tiny_negative = (q * np.array([-1e-14, 1.0, 2.0, 3.0])) @ q.T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.frechet_distance_from_stats(np.zeros(4), tiny_negative, np.zeros(4), np.eye(4))
    indefinite = (q * np.array([-0.5, 1.0, 2.0, 3.0])) @ q.T
    with pytest.warns(M.NotPSDWarning, match="cov1 is not positive semi-definite"):
        d = M.frechet_distance_from_stats(np.zeros(4), indefinite, np.zeros(4), np.eye(4))
    assert np.isfinite(d)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="feature sizes differ"):
        M.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3)))


# -- KID -------------------------------------------------------------------------------------------


def _mmd2_loops(x, y):
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, pair by pair."""
    d = x.shape[1]
    k = lambda u, v: (float(np.dot(u, v)) / d + 1.0) ** 3
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kid_matches_direct_implementation():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 5)), 0.4 + rng.standard_normal((30, 5))
    # One subset of all rows is a permutation of each set: the full-set estimate.
    mean, std = M.kernel_inception_distance(x, y, num_subsets=1, subset_size=30, seed=3)
    np.testing.assert_allclose(mean, _mmd2_loops(x, y), rtol=1e-10)
    assert std == 0.0
    # subset_size is capped at the smaller set.
    mean, _ = M.kernel_inception_distance(x, y[:20], num_subsets=1, subset_size=1000, seed=0)
    assert np.isfinite(mean)


def test_kid_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((500, 16)), rng.standard_normal((500, 16))
    mean, std = M.kernel_inception_distance(x, y, num_subsets=20, subset_size=200, seed=0)
    assert std > 0 and abs(mean) < 3 * std
    mean_shift, std_shift = M.kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=200, seed=0)
    assert mean_shift > 10 * max(std, std_shift)
    # The seed fixes the subsets.
    assert M.kernel_inception_distance(x, y, num_subsets=3, subset_size=50, seed=7) == (
        M.kernel_inception_distance(x, y, num_subsets=3, subset_size=50, seed=7)
    )


# -- classifier score ------------------------------------------------------------------------------


def test_classifier_score_closed_forms():
    uniform = M.classifier_score(np.zeros((40, 10)))
    np.testing.assert_allclose(uniform["classifier_score"], 1.0, rtol=1e-12)
    confident = M.classifier_score(1e3 * np.tile(np.eye(10), (4, 1)))  # each class 4 times, p(y|x) one-hot
    np.testing.assert_allclose(confident["classifier_score"], 10.0, rtol=1e-9)
    np.testing.assert_allclose(confident["class_histogram"], np.full(10, 0.1), rtol=1e-12)
    np.testing.assert_allclose(confident["class_entropy"], np.log(10), rtol=1e-12)
    collapsed = M.classifier_score(1e3 * np.tile(np.eye(10)[:1], (8, 1)))  # every sample one class
    np.testing.assert_allclose(collapsed["classifier_score"], 1.0, rtol=1e-9)
    assert collapsed["class_entropy"] == 0.0


# -- the digits classifier -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clf():
    return M.digits_classifier(seed=0, steps=FAST_STEPS)


@pytest.fixture(scope="module")
def test_split():
    return M._full_split("test")


def test_digits_classifier_api_and_accuracy(clf, test_split):
    x, labels = test_split
    assert isinstance(clf, M.Classifier) and isinstance(clf, M.FeatureExtractor)
    assert clf.features(x[:5]).shape == (5, 64) and clf(x[:5]).shape == (5, 64)
    assert clf.logits(x[:5]).shape == (5, 10)
    assert clf.predict(x[:5]).shape == (5,)
    assert clf.accuracy(x, labels) >= 0.9
    np.testing.assert_array_equal(clf.features(x[:3].reshape(3, 64)), clf.features(x[:3]))


def _same_params(p, q):
    leaves = zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True)
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in leaves)


def test_digits_classifier_retrains_bitwise_and_caches(clf, tmp_path):
    again = M.digits_classifier(seed=0, steps=FAST_STEPS)
    assert _same_params(clf.params, again.params)
    other = M.digits_classifier(seed=1, steps=FAST_STEPS)
    assert not _same_params(clf.params, other.params)

    written = M.digits_classifier(seed=0, steps=FAST_STEPS, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".msgpack"
    loaded = M.digits_classifier(seed=0, steps=FAST_STEPS, cache_dir=tmp_path)
    assert written.train_seconds is not None and loaded.train_seconds is None
    assert _same_params(loaded.params, clf.params)


@pytest.mark.slow
def test_digits_classifier_default_reaches_95_percent(test_split):
    x, labels = test_split
    assert M.digits_classifier(seed=0).accuracy(x, labels) >= 0.95


# -- evaluate_samples and other extractors -----------------------------------------------------------


def test_evaluate_samples_orders_real_data_before_noise(clf, test_split):
    x, _ = test_split
    train_x, _ = M._full_split("train")
    noise = np.clip(np.random.default_rng(0).normal(size=x.shape), -1, 1).astype(np.float32)
    real = M.evaluate_samples(train_x[:300], x, clf, kid_subsets=10, kid_subset_size=100, batch_size=128)
    fake = M.evaluate_samples(noise, x, clf, kid_subsets=10, kid_subset_size=100, batch_size=128)
    keys = {"fid", "kid_mean", "kid_std", "classifier_score", "class_histogram", "class_entropy"}
    assert keys <= set(real)
    assert real["fid"] < 0.1 * fake["fid"] and real["kid_mean"] < 0.1 * fake["kid_mean"]
    assert real["classifier_score"] > fake["classifier_score"]
    assert real["num_samples"] == 300 and real["feature_dim"] == 64
    np.testing.assert_allclose(sum(real["class_histogram"]), 1.0, rtol=1e-12)
    same = M.evaluate_samples(x, x, clf, kid_subsets=2, kid_subset_size=100)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(same["classifier_score"], same["reference_classifier_score"], rtol=1e-12)


def test_plain_function_extractor_and_inception_wrapper():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, (20, 8, 8, 1)), rng.uniform(-1, 1, (30, 8, 8, 1))
    flat = lambda im: jnp.reshape(im, (im.shape[0], -1))
    out = M.evaluate_samples(x, y, flat, kid_subsets=2, kid_subset_size=10, batch_size=8)
    assert "classifier_score" not in out and out["feature_dim"] == 64

    seen = {}

    def fake_inception(images):
        seen["shape"], seen["range"] = images.shape, (float(images.min()), float(images.max()))
        return jnp.mean(images, axis=(1, 2))

    extractor = M.inception_features_from_fn(fake_inception, image_size=16, input_range=(0.0, 1.0))
    assert isinstance(extractor, M.FeatureExtractor)
    assert extractor(x[:4]).shape == (4, 3)
    assert seen["shape"] == (4, 16, 16, 3) and 0.0 <= seen["range"][0] <= seen["range"][1] <= 1.0
    with pytest.raises(ValueError, match="cannot download"):
        M.get_feature_extractor("inception")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        M.get_feature_extractor("vgg")


# -- experiments/evaluate.py ---------------------------------------------------------------------------

EVALUATE = os.path.join(os.path.dirname(__file__), "..", "experiments", "evaluate.py")


def _run_evaluate(*args, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, EVALUATE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_evaluate_script_names_a_missing_workdir_or_checkpoint(tmp_path):
    missing = tmp_path / "nowhere"
    out = _run_evaluate("--workdir", str(missing))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"error: --workdir {missing}: no such directory"]
    out = _run_evaluate("--workdir", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "config.json" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_evaluate_script_end_to_end_on_a_two_step_digits_run(tmp_path):
    config = tmp_path / "digits_tiny.py"
    config.write_text(
        "import importlib.util\nfrom ml_collections import ConfigDict\n"
        f"spec = importlib.util.spec_from_file_location('toy', {os.path.abspath(EVALUATE)!r}.replace("
        "'evaluate.py', 'configs/toy_vp_mlp.py'))\n"
        "toy = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(toy)\n\n"
        "def get_config():\n    c = toy.get_config()\n    c.data.dataset = 'digits'\n"
        "    c.model = ConfigDict(dict(name='ddpmpp', nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),\n"
        "        dropout=0.0, parameterization='eps', scale_by_sigma=False, ema_rate=0.999))\n"
        "    c.training.batch_size, c.training.n_iters, c.training.progress_bar = 16, 2, False\n"
        "    c.eval.enabled, c.eval.ode_tol, c.sampling.steps = False, 1e-3, 5\n    return c\n"
    )
    workdir = tmp_path / "run"
    train = EVALUATE.replace("evaluate.py", "train.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, train, f"--config={config}", f"--workdir={workdir}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=env)
    out = _run_evaluate("--workdir", str(workdir), "--num_samples", "100", "--likelihood_examples", "8", timeout=600)
    assert out.returncode == 0, out.stderr
    results = json.loads((workdir / "eval.json").read_text())
    names = {r["name"]: r for r in results["scores"]}
    assert {"bits_per_dim", "fid", "kid_mean", "kid_std", "classifier_score"} <= set(names)
    assert names["bits_per_dim"]["num_probes"] == 1 and names["bits_per_dim"]["nfe"] > 0
    assert names["fid"]["nfe"] == 5 and all(np.isfinite(r["value"]) for r in results["scores"])
