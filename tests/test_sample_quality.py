"""Tests of the sample-quality metrics of evaluation.py (SPEC §8), the digit classifier and its training script.

Closed forms:
- Fréchet distance of N(μ1, Σ1), N(μ2, Σ2) with Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ (commuting):
  ||μ1 - μ2||² + Σ_i (√a_i - √b_i)²; in 1-D the squared 2-Wasserstein distance (μ1 - μ2)² + (σ1 - σ2)².
- Inception Score: uniform predictions give exp(0) = 1; one-hot predictions spread evenly over C classes give
  exp(log C) = C; predictions [q, 1-q] for half the points and [1-q, q] for the other half give
  p(y) = [½, ½] and exp(log 2 - H(q)) = 2 exp(-H(q)), H the binary entropy.
- KID's population value for X ~ N(a, A), Y ~ N(b, B) under k(x, y) = (x·y/d + 1)³: with u = X·Y for
  independent X, Y, E u = a·b, E u² = (a·b)² + aᵀBa + bᵀAb + tr(AB), and (conditioning on X, u | X ~ N(X·b, XᵀBX))
  E u³ = (a·b)³ + 3 (a·b) bᵀAb + 3 [(a·b)(aᵀBa + tr(AB)) + 2 bᵀABa]; E k = E u³/d³ + 3 E u²/d² + 3 E u/d + 1 and
  MMD² = E k(X, X') + E k(Y, Y') - 2 E k(X, Y). The unbiased estimator's mean is exactly this.
"""
import importlib.util
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.linalg

import evaluation
import run_lib
import sampling
from configs.default_toy_configs import get_default_configs as get_toy_configs
from configs.vp import mnist_ddpmpp_continuous
from models import digit_classifier

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_digit_classifier",
                                                  ROOT / "scripts" / "train_digit_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()


def _random_spd(rng, d):
    m = rng.standard_normal((d, d))
    return m @ m.T / d + 0.1 * np.eye(d)


# --- Fréchet distance. ---

def test_fid_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fid = evaluation.fid_from_stats(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert fid == pytest.approx(expected, rel=1e-10)      # float64 eigendecompositions of 6x6 matrices
    assert evaluation.fid_from_stats([1.0], [[4.0]], [-0.5], [[0.25]]) == pytest.approx(1.5**2 + 1.5**2, rel=1e-12)


def test_fid_of_general_covariances_equals_scipy_sqrtm():
    """Non-commuting Σ1, Σ2: the symmetric-form trace equals tr of scipy's principal sqrtm of Σ1Σ2 (independent)."""
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(rng, 10), _random_spd(rng, 10)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    expected = np.trace(s1) + np.trace(s2) - 2.0 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    # Two float64 routes to the same trace (eigh + SVD here, Schur there): measured 3e-15 apart.
    assert evaluation.fid_from_stats(np.zeros(10), s1, np.zeros(10), s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [50, 500])
def test_fid_of_a_set_with_itself_is_zero_and_order_free(n):
    """n = 50 < d = 100: a singular covariance (rank 49), where sqrtm of the product needs ε-offsets."""
    rng = np.random.default_rng(2)
    features = rng.standard_normal((n, 100)) @ rng.standard_normal((100, 100))
    mu, sigma = evaluation.feature_statistics(features)
    assert abs(evaluation.fid_from_stats(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)   # rounding only
    other = evaluation.feature_statistics(features[::-1] + 0.3)
    shifted = evaluation.fid_from_stats(mu, sigma, *other)
    assert shifted == pytest.approx(100 * 0.3**2, rel=1e-7)      # a shift adds ||δ||², Σ unchanged (seen: 3e-12)
    permuted = evaluation.feature_statistics(rng.permutation(features))
    assert evaluation.fid_from_stats(*permuted, *other) == pytest.approx(shifted, rel=1e-9)   # summation order only


def test_fid_from_samples_converges_to_the_closed_form():
    """Statistics of 200,000 draws per Gaussian: the plug-in FID is within its Monte-Carlo error of the truth."""
    rng = np.random.default_rng(3)
    a, b = np.array([1.0, 0.5, 2.0]), np.array([0.3, 1.5, 2.0])
    x = rng.standard_normal((200_000, 3)) * np.sqrt(a)
    y = 0.2 + rng.standard_normal((200_000, 3)) * np.sqrt(b)
    fid = evaluation.fid_from_stats(*evaluation.feature_statistics(x), *evaluation.feature_statistics(y))
    expected = 3 * 0.2**2 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid == pytest.approx(expected, abs=0.01)   # plug-in error O(d / n) plus noise O(1/√n) ~ 0.003


def test_fid_rejects_statistics_of_different_networks():
    with pytest.raises(ValueError, match="same feature network"):
        evaluation.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- Inception Score. ---

def test_inception_score_closed_forms():
    n, c = 200, 5
    assert evaluation.inception_score(np.zeros((n, c))) == (pytest.approx(1.0, abs=1e-12), pytest.approx(0.0))
    one_hot = np.eye(c)[np.arange(n) % c]        # every split of 20 holds each class 4 times
    assert evaluation.inception_score(one_hot, from_logits=False) == (pytest.approx(c, rel=1e-12),
                                                                      pytest.approx(0.0, abs=1e-9))
    assert evaluation.inception_score(60.0 * one_hot)[0] == pytest.approx(c, rel=1e-12)   # e^-60 off-class mass
    q = 0.9
    probs = np.array([[q, 1 - q], [1 - q, q]])[np.arange(n) % 2]
    entropy = -q * np.log(q) - (1 - q) * np.log(1 - q)
    assert evaluation.inception_score(probs, splits=4, from_logits=False)[0] == pytest.approx(
        2.0 * np.exp(-entropy), rel=1e-12)


def test_inception_score_splits_and_order():
    rng = np.random.default_rng(4)
    logits = 3.0 * rng.standard_normal((103, 7))
    whole = evaluation.inception_score(logits, splits=1)[0]
    assert evaluation.inception_score(rng.permutation(logits), splits=1)[0] == pytest.approx(whole, rel=1e-12)
    # 10 splits of 10: the last 3 predictions are dropped, as in the original code.
    scores = [evaluation.inception_score(logits[10 * k:10 * (k + 1)], splits=1)[0] for k in range(10)]
    assert evaluation.inception_score(logits, splits=10) == (pytest.approx(np.mean(scores), rel=1e-12),
                                                              pytest.approx(np.std(scores), rel=1e-9))


# --- KID. ---

def _kernel_mean(a, cov_a, b, cov_b):
    """E k(X, Y) for independent X ~ N(a, A), Y ~ N(b, B) under (x·y/d + 1)³ (module docstring)."""
    d = len(a)
    mu, tab = a @ b, np.trace(cov_a @ cov_b)
    e1 = mu
    e2 = mu**2 + a @ cov_b @ a + b @ cov_a @ b + tab
    e3 = mu**3 + 3 * mu * (b @ cov_a @ b) + 3 * (mu * (a @ cov_b @ a + tab) + 2 * b @ cov_a @ cov_b @ a)
    return e3 / d**3 + 3 * e2 / d**2 + 3 * e1 / d + 1


def test_mmd2_unbiased_equals_brute_force_sums():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((9, 3)), rng.standard_normal((7, 3)) + 0.5
    k = lambda u, v: (np.dot(u, v) / 3 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    xy = sum(k(x[i], y[j]) for i in range(9) for j in range(7)) / (9 * 7)
    assert evaluation.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    # Subsets as large as the sets are permutations of them: every subset gives that value, s.e. 0.
    mean, se = evaluation.kid(jax.random.PRNGKey(0), x[:7], y, subsets=3, subset_size=50)
    assert mean == pytest.approx(evaluation.mmd2_unbiased(x[:7], y), rel=1e-12) and se < 1e-12


def test_kid_of_identical_sets_is_the_unbiased_closed_form():
    """Identical sets of m: the unbiased estimate is 2 (ō - d̄) / m, ō and d̄ the mean off-diagonal and diagonal
    kernel values, O(1/m) and below 0; the biased V-statistic would give exactly 0. Subsets as large as the set
    are the set itself, so every subset pair gives this value."""
    x = np.random.default_rng(11).standard_normal((40, 6))
    k = (x @ x.T / 6 + 1) ** 3
    off, diag = (k.sum() - np.trace(k)) / (40 * 39), np.trace(k) / 40
    mean, se = evaluation.kid(jax.random.PRNGKey(5), x, x, subsets=5, subset_size=40)
    assert mean == pytest.approx(2 * (off - diag) / 40, rel=1e-10)     # float64 sums of 1,600 terms
    assert mean < 0 and se < 1e-12                                      # 5 permutations: rounding only


A_MEAN, A_COV = np.zeros(4), np.diag([1.0, 0.5, 2.0, 1.0])
B_MEAN, B_COV = np.array([0.5, -0.3, 0.0, 0.2]), np.diag([0.8, 0.5, 1.5, 1.2])


def _draw(rng, mean, cov, n):
    return mean + rng.standard_normal((n, len(mean))) * np.sqrt(np.diag(cov))


def test_kid_of_shifted_gaussians_equals_the_closed_form():
    """Pools of 200,000 draws, 400 subsets of 100: the pools' own error is ~0.2 s.e. (√(m/N) of a subset's s.d.),
    so 4 s.e. bound the difference; the biased V-statistic would be off by ~0.4 here (~15 s.e.)."""
    rng = np.random.default_rng(6)
    expected = (_kernel_mean(A_MEAN, A_COV, A_MEAN, A_COV) + _kernel_mean(B_MEAN, B_COV, B_MEAN, B_COV)
                - 2 * _kernel_mean(A_MEAN, A_COV, B_MEAN, B_COV))      # 0.4736
    x, y = _draw(rng, A_MEAN, A_COV, 200_000), _draw(rng, B_MEAN, B_COV, 200_000)
    mean, se = evaluation.kid(jax.random.PRNGKey(1), x, y, subsets=400, subset_size=100)
    assert abs(mean - expected) < 4 * se, (mean, se, expected)
    same, same_se = evaluation.kid(jax.random.PRNGKey(2), x, _draw(rng, A_MEAN, A_COV, 200_000), 400, 100)
    assert abs(same) < 4 * same_se, (same, same_se)            # identical distributions: MMD² = 0
    assert expected > 10 * se                                   # the shift is resolved


# --- Reference statistics and preprocessing. ---

def test_reference_stats_layouts(tmp_path):
    rng = np.random.default_rng(7)
    features = rng.standard_normal((40, 5))
    stats = evaluation.stats_from_features(features, "net A")
    evaluation.save_reference_stats(tmp_path / "ours.npz", stats)
    back = evaluation.load_reference_stats(tmp_path / "ours.npz")
    assert back.identity == "net A"
    np.testing.assert_array_equal(back.features, features)
    np.testing.assert_array_equal(back.sigma, np.cov(features, rowvar=False))
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)
    only = evaluation.load_reference_stats(tmp_path / "pytorch_fid.npz")
    assert only.features is None and only.identity == ""
    np.savez(tmp_path / "cifar10_stats.npz", pool_3=features.astype(np.float32))     # the score-SDE layout
    score_sde = evaluation.load_reference_stats(tmp_path / "cifar10_stats.npz")
    np.testing.assert_allclose(score_sde.mu, features.astype(np.float32).astype(np.float64).mean(axis=0),
                               rtol=1e-12)
    np.savez(tmp_path / "other.npz", logits=features)
    with pytest.raises(ValueError, match="need mu and sigma .* or pool_3"):
        evaluation.load_reference_stats(tmp_path / "other.npz")


def test_reference_stats_are_computed_once_and_checked(tmp_path):
    calls = []
    extractor = evaluation.FeatureExtractor("toy", "toy net", lambda x: (x.reshape(len(x), -1), x[:, 0, 0]), ())
    images = np.random.default_rng(8).random((20, 2, 2, 1)).astype(np.float32)
    path = str(tmp_path / "stats" / "toy.npz")
    first = evaluation.reference_stats(extractor, path, lambda: calls.append(1) or images, batch_size=8)
    second = evaluation.reference_stats(extractor, path, lambda: calls.append(1) or images, batch_size=8)
    assert calls == [1]
    np.testing.assert_array_equal(first.sigma, second.sigma)
    np.testing.assert_allclose(first.features, images.reshape(20, 4), rtol=1e-7)
    other = evaluation.FeatureExtractor("toy", "another net", extractor.apply, ())
    with pytest.raises(ValueError, match="made by 'toy net', not by 'another net'"):
        evaluation.reference_stats(other, path, lambda: images, batch_size=8)


@pytest.mark.parametrize("data_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_to_unit_range_recovers_the_integer_images(data_range):
    """x = a (k + u)/K + b for any u ∈ [0, 1) maps back to k / (K - 1); K = 17 as DIGITS."""
    k = np.arange(17)
    low, high = data_range
    for u in (0.0, 0.5, 0.999):
        x = (high - low) * (k + u) / 17 + low
        np.testing.assert_array_equal(evaluation.to_unit_range(x, data_range, 17), (k / 16).astype(np.float32))
    assert evaluation.to_unit_range(np.array([low - 1, high + 1]), data_range).tolist() == [0.0, 1.0]


# --- The digit classifier. ---

@pytest.fixture(scope="module")
def digits():
    return script.load_labelled("DIGITS")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The script's train_and_save with 200 Adam steps of 64 (measured: test accuracy 0.953; the script's default
    600 steps give 0.987)."""
    path = tmp_path_factory.mktemp("classifier") / "digits.msgpack"
    meta = script.train_and_save("DIGITS", path, seed=0, steps=200)
    return path, meta["test_accuracy"]


def test_labels_follow_the_dataset_split(digits):
    """The split of datasets.py (a permutation of 1,797 by default_rng(0), the first 300 for test), rebuilt here."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    order = np.random.default_rng(0).permutation(len(raw.target))
    np.testing.assert_array_equal(digits.test_labels, raw.target[order[:300]])
    np.testing.assert_array_equal(digits.train_labels, raw.target[order[300:]])
    np.testing.assert_array_equal(digits.train_images[..., 0], raw.images[order[300:]].astype(np.uint8))
    assert digits.levels == 17


def test_the_script_writes_a_classifier_that_loads_back(digits, trained):
    """train_and_save (the script's main) writes the weights with their metadata; loaded back, the network has
    the test accuracy the script measured before saving."""
    module, params, meta = digit_classifier.load_classifier(trained[0])
    assert (meta["dataset"], meta["image_shape"], int(meta["levels"]), int(meta["steps"])) == ("DIGITS", (8, 8, 1),
                                                                                               17, 200)
    accuracy = script.accuracy(module, params, script.unit_images(digits.test_images, 17), digits.test_labels)
    assert accuracy == meta["test_accuracy"] == trained[1]


@pytest.mark.slow
def test_the_script_runs_from_the_command_line(tmp_path):
    """The command of the script's docstring (2 steps instead of 600): it writes a loadable file."""
    output = tmp_path / "digits.msgpack"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_digit_classifier.py"), "--dataset=DIGITS",
                             f"--output={output}", "--steps=2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"weights written to {output}" in result.stdout
    assert int(digit_classifier.load_classifier(output)[2]["steps"]) == 2


def test_classifier_training_is_accurate_and_deterministic(digits, trained):
    assert trained[1] > 0.9
    once = script.train(digits, seed=3, steps=5)[1]
    again = script.train(digits, seed=3, steps=5)[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(once), jax.tree_util.tree_leaves(again)))


def _classifier_config(path, **eval_fields):
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict({"dataset": "DIGITS", "image_size": 8, "num_channels": 1,
                                             "centered": True})
    config.eval = ml_collections.ConfigDict({"sample_quality_features": "classifier", "classifier_weights": str(path),
                                             "batch_size": 64, "num_samples": 400, "kid_subsets": 50,
                                             "kid_subset_size": 100, "is_splits": 5, **eval_fields})
    return config


def test_classifier_distances_separate_data_from_noise(digits, trained):
    """FCD / KCD of the test split vs the train split are far below those vs uniform noise images, and the
    classifier score of real digits is near the 10 classes (noise: near 1, one class or a few)."""
    (extractor,) = evaluation.get_feature_extractors(_classifier_config(trained[0]), 17)
    unit = lambda k: script.unit_images(k, 17)
    test_f, test_logits = evaluation.extract_features(extractor, unit(digits.test_images), 64)
    train_f, _ = evaluation.extract_features(extractor, unit(digits.train_images), 64)
    noise = np.random.default_rng(9).integers(0, 17, (1000, 8, 8, 1))
    noise_f, noise_logits = evaluation.extract_features(extractor, unit(noise), 64)
    fcd = lambda a, b: evaluation.fid_from_stats(*evaluation.feature_statistics(a), *evaluation.feature_statistics(b))
    assert fcd(test_f, train_f) < 0.05 * fcd(test_f, noise_f), (fcd(test_f, train_f), fcd(test_f, noise_f))
    kcd = evaluation.kid(jax.random.PRNGKey(3), test_f, train_f, 20, 100)
    kcd_noise = evaluation.kid(jax.random.PRNGKey(3), test_f, noise_f, 20, 100)
    assert kcd[0] < 0.05 * kcd_noise[0]
    assert evaluation.inception_score(test_logits, splits=1)[0] > 7.0
    assert evaluation.inception_score(noise_logits, splits=1)[0] < 4.0


def test_features_do_not_depend_on_the_batch_size(digits, trained):
    (extractor,) = evaluation.get_feature_extractors(_classifier_config(trained[0]), 17)
    images = script.unit_images(digits.test_images[:50], 17)
    small = evaluation.extract_features(extractor, images, 7)      # 7 batches, the last padded from 1 to 7
    large = evaluation.extract_features(extractor, images, 64)     # one batch padded from 50 to 64
    for a, b in zip(small, large):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)     # float32 kernels of other batch shapes


def test_evaluator_scores_samples_against_held_out_data(digits, trained, tmp_path):
    """The evaluator given training images as samples (dequantized as the data are): their FCD / KCD to the
    held-out reference are small, those of noise images large; the reference statistics are written to
    config.eval.classifier_stats and reused. Without that file they are computed on an evaluator's first run and
    kept for its later runs (run_lib scores every checkpoint against them)."""
    def sample_batches(source):
        idx = np.random.default_rng(4).choice(len(source), 400, replace=False)
        return [2.0 * (source[i] + 0.5) / 17 - 1.0 for i in np.split(idx, 4)]

    stats = tmp_path / "digits_classifier_stats.npz"
    config = _classifier_config(trained[0], classifier_stats=str(stats))
    held_out = [2.0 * (digits.test_images[i:i + 100] + 0.5) / 17 - 1.0 for i in range(0, 300, 100)]
    results = {}
    for name, source in (("train", digits.train_images), ("noise", np.random.default_rng(10).integers(
            0, 17, (1000, 8, 8, 1)))):
        run = evaluation.sample_quality_evaluator(config, (-1.0, 1.0), 17)
        results[name] = dict(run(jax.random.PRNGKey(4), sample_batches(source), held_out))
    assert set(results["train"]) == {"num_samples", "fcd", "kcd", "kcd_se", "classifier_score",
                                     "classifier_score_std"}
    assert results["train"]["num_samples"] == 400 and stats.exists()
    assert results["train"]["fcd"] < 0.05 * results["noise"]["fcd"]
    assert results["train"]["kcd"] < 0.05 * results["noise"]["kcd"]
    assert results["train"]["classifier_score"] > 2 * results["noise"]["classifier_score"]
    saved = evaluation.load_reference_stats(stats)
    assert saved.features.shape == (300, 128) and saved.identity.startswith("digit classifier of DIGITS sha256:")
    run = evaluation.sample_quality_evaluator(_classifier_config(trained[0]), (-1.0, 1.0), 17)
    noise = sample_batches(np.random.default_rng(10).integers(0, 17, (1000, 8, 8, 1)))
    first = dict(run(jax.random.PRNGKey(4), noise, held_out))
    # The same numbers from the statistics file (float64 kept) and, on a second run given only 100 of the
    # held-out images, from the statistics of the first run's 300.
    assert dict(run(jax.random.PRNGKey(4), noise, held_out[:1])) == first == results["noise"]


def test_configuration_errors_say_what_to_do(tmp_path, trained):
    config = _classifier_config(trained[0])
    config.data.image_size = 28
    with pytest.raises(ValueError, match="trained on DIGITS .* the data are \\(28, 28, 1\\)"):
        evaluation.get_feature_extractors(config, 256)
    with pytest.raises(ValueError, match="train them with python scripts/train_digit_classifier.py"):
        evaluation.get_feature_extractors(_classifier_config(tmp_path / "absent.msgpack"), 17)
    with pytest.raises(ValueError, match="unknown sample-quality features \\['fid'\\]"):
        evaluation.get_feature_extractors(_classifier_config(trained[0], sample_quality_features="classifier,fid"))
    with pytest.raises(ValueError, match="download https://github.com/mseitzer/pytorch-fid/releases"):
        evaluation.get_feature_extractors(_classifier_config(trained[0], sample_quality_features="inception"))
    (tmp_path / "foreign.msgpack").write_bytes(b"\x93\x01\x02\x03")
    with pytest.raises(ValueError, match="not a classifier file"):
        digit_classifier.load_classifier(tmp_path / "foreign.msgpack")


# --- --mode=eval with the sample-quality metrics (run_lib). ---

def _digits_run_config(classifier, **eval_fields):
    """DIGITS 8x8 in [-1, 1] (VP SDE) with a one-block MLP score network, and an eval of checkpoint 1 (step 2) that
    computes only the classifier metrics of 100 samples (25 Euler-Maruyama steps)."""
    config = mnist_ddpmpp_continuous.get_config()
    config.data.dataset, config.data.image_size = "DIGITS", 8
    model = config.model
    model.name, model.nf, model.num_layers, model.num_scales = "mlp", 16, 1, 25
    config.training.batch_size, config.training.snapshot_freq = 16, 2
    config.sampling.predictor, config.sampling.corrector = "euler_maruyama", "none"
    e = config.eval
    e.begin_ckpt = e.end_ckpt = 1
    e.enable_bpd, e.enable_sample_quality = False, True
    e.sample_quality_features, e.classifier_weights = "classifier", str(classifier)
    e.batch_size, e.num_samples, e.num_test = 50, 100, 100
    e.kid_subsets, e.kid_subset_size, e.is_splits = 10, 50, 2
    e.update(eval_fields)
    return config


def test_eval_mode_writes_the_sample_quality_metrics(trained, tmp_path):
    """run_lib.evaluate with eval.enable_sample_quality: the classifier metrics of the checkpoint's samples are in
    eval/metrics.jsonl (and TensorBoard), equal to those of sample_quality_evaluator run here on the saved EMA
    parameters with the checkpoint's eval rng (the eval stream folded with the step, then with the evaluator's
    position, 1) and reference statistics computed afresh; the eval wrote its reference statistics to
    eval.classifier_stats. The checkpoint's EMA parameters are random (the output layer's zeros included), so
    the samples depend on which parameters the eval restores."""
    stats, workdir = tmp_path / "reference.npz", tmp_path / "run"
    config = _digits_run_config(trained[0], classifier_stats=str(stats))
    setup = run_lib.Setup(config)
    leaves, tree = jax.tree.flatten(setup.initial_state.ema_params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    ema = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    manager = run_lib.checkpoint_managers(str(workdir), config)[0]
    manager.save(2, args=ocp.args.StandardSave(setup.initial_state.replace(ema_params=ema)))
    manager.wait_until_finished()
    run_lib.evaluate(config, str(workdir))
    (record,) = run_lib.read_metrics(workdir / "eval" / "metrics.jsonl")

    # The same computation here: shard k of the samples from the eval stream folded with the step and then
    # run_lib._QUALITY_SAMPLES, then k; the metrics' rng: that stream folded with the evaluator's position, 1.
    fresh = _digits_run_config(trained[0])
    run = evaluation.sample_quality_evaluator(fresh, setup.dataset.data_range, setup.dataset.levels)
    rng = jax.random.fold_in(setup.rngs["eval"], 2)
    sample_fn = sampling.get_sampling_fn(config, setup.sde, (50, 8, 8, 1))
    samples = [np.asarray(sample_fn(jax.random.fold_in(jax.random.fold_in(rng, run_lib._QUALITY_SAMPLES), k),
                                    setup.score_fn(ema))[0]) for k in range(2)]
    direct = dict(run(jax.random.fold_in(rng, 1), samples, [setup.dataset.reference_data()]))
    assert set(direct) == {"num_samples", "fcd", "kcd", "kcd_se", "classifier_score", "classifier_score_std"}
    assert record == {"step": 2, **direct}      # the same computation: bit-identical, through JSON's repr
    events = b"".join(p.read_bytes() for p in (workdir / "eval").glob("events.out.tfevents*"))
    assert all(name.encode() in events for name in direct)
    assert evaluation.load_reference_stats(stats).features.shape == (300, 128)   # every test image, not num_test
    shards = sorted((workdir / "eval" / "step_00000002" / "samples").glob("shard_*.npz"))
    for shard, x in zip(shards, samples, strict=True):
        np.testing.assert_array_equal(np.load(shard)["samples"], x)


SAMPLE_QUALITY_ERRORS = [
    ({"sample_quality_features": "classifier,fid"}, r"unknown sample-quality features \['fid'\]"),
    ({"inception_preprocessing": "antialias"}, r"config.eval.inception_preprocessing: unknown preprocessing"),
    ({"kid_subset_size": 1}, r"config.eval.kid_subset_size must be >= 2, got 1"),
    ({"num_samples": 1}, r"config.eval.num_samples must be >= 2, got 1"),
]


@pytest.mark.parametrize("fields, message", SAMPLE_QUALITY_ERRORS, ids=[m[:30] for _, m in SAMPLE_QUALITY_ERRORS])
def test_validate_config_checks_the_sample_quality_settings(fields, message):
    run_lib.validate_config(_digits_run_config("unused.msgpack"))    # weights are read when the eval builds it
    with pytest.raises(ValueError, match=message):
        run_lib.validate_config(_digits_run_config("unused.msgpack", **fields))


def test_sample_quality_needs_image_data():
    config = get_toy_configs()
    config.eval.enable_sample_quality = True
    with pytest.raises(ValueError, match="needs image data; dataset 'eight_gaussians' is not an image set"):
        run_lib.validate_config(config)


# --- The time-dependent classifier and class-conditional sampling (score-SDE paper, Appendix I). ---

@pytest.fixture(scope="module")
def noisy_classifier(tmp_path_factory):
    """The script's time-dependent classifier for the DIGITS run config's VP SDE, 600 Adam steps of 64 (4 s)."""
    path = tmp_path_factory.mktemp("noisy") / "digits_noisy.msgpack"
    meta = script.train_and_save("DIGITS", path, seed=0, steps=600, noise_config=_digits_run_config("unused"))
    return path, meta


def test_noise_conditional_classifier_reads_clean_digits_and_fewer_noisy_ones(noisy_classifier):
    """Accuracy on the test digits diffused to t = 1e-5 (σ ≈ 0.003) is high; at t = 0.5 (signal x 0.28, noise σ 0.96
    on [-1, 1] pixels) lower but above chance (0.1). Measured: 0.937 and 0.237 (1000 steps: 0.960, 0.263)."""
    meta = noisy_classifier[1]
    assert meta["noise_conditional"] and meta["sde"] == "vpsde" and meta["centered"]
    assert meta["test_accuracy"] > 0.9 and 0.15 < meta["test_accuracy_t05"] < meta["test_accuracy"]
    module, _, loaded = digit_classifier.load_classifier(noisy_classifier[0])
    assert module.noise_conditional and loaded["test_accuracy"] == meta["test_accuracy"]


def test_class_conditional_mode_draws_every_class(trained, noisy_classifier, tmp_path):
    """--mode=class_conditional on a checkpoint (random EMA parameters): 10 classes x 3 samples, one PNG row per
    class, and the clean classifier's agreement with the requested classes. A clean classifier in place of the
    time-dependent one is refused, and the time-dependent one is refused as the sample-quality features."""
    config = _digits_run_config(trained[0])
    config.sampling.num_samples = 30
    workdir = tmp_path / "run"
    setup = run_lib.Setup(config)
    manager = run_lib.checkpoint_managers(str(workdir), config)[0]
    manager.save(2, args=ocp.args.StandardSave(setup.initial_state))
    manager.wait_until_finished()
    x, agreement = run_lib.class_conditional(config, str(workdir), str(noisy_classifier[0]), scale=4.0, per_class=3)
    assert x.shape == (10, 3, 8, 8, 1) and np.isfinite(x).all() and 0.0 <= agreement <= 1.0
    # Scale 0 is the unconditional sampler with the same randomness; the classifier's gradient moves the samples.
    plain, _ = run_lib.class_conditional(config, str(workdir), str(noisy_classifier[0]), scale=0.0, per_class=3)
    sample_fn = sampling.get_sampling_fn(config, setup.sde, (30, 8, 8, 1))
    unconditional, _ = sample_fn(jax.random.fold_in(setup.rngs["sample"], 2), setup.score_fn(
        setup.initial_state.ema_params))
    np.testing.assert_allclose(plain.reshape(30, 8, 8, 1), unconditional, atol=1e-5)
    assert np.abs(x - plain).mean() > 0.01
    assert (workdir / "samples" / "class_conditional_step_00000002.png").exists()
    with pytest.raises(ValueError, match="is not a time-dependent classifier of this config"):
        run_lib.class_conditional(config, str(workdir), str(trained[0]))
    with pytest.raises(ValueError, match="is time-dependent"):
        evaluation.get_feature_extractors(_classifier_config(noisy_classifier[0]), 17)
