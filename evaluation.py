"""Score-model metrics and evaluators (SPEC §5, §8).

The metrics are pure functions of a score function `score_fn(x, t)` (x [B, ...], t [B]) and return one value
per example [B]: the score Fokker-Planck residual (SPEC §5) and the conservativity of the Jacobian (SPEC §5).
Evaluators wrap them for a training run: `run(rng, score_fn, data)` takes an iterable of data batches x_0
[B, ...] (a list of arrays will do) and yields (name, value) pairs that the loop logs as they are.
The last section holds the sample-quality metrics of SPEC §8 (FID, IS, KID and their digit-classifier versions)
and their evaluator.
"""
import dataclasses
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from scipy import special

from models import digit_classifier, inception
from sde_lib import batch_mul, check_eps

# --- Probes (Hutchinson, conservativity). ---

_PROBES = {
    "rademacher": lambda rng, shape: jax.random.rademacher(rng, shape, jnp.float32),
    "gaussian": lambda rng, shape: jax.random.normal(rng, shape, jnp.float32),
}


def sample_probe(rng, shape, probe_type):
    """Zero-mean, unit-covariance probes of shape `shape`: "rademacher" (±1) or "gaussian"."""
    if probe_type not in _PROBES:
        raise ValueError(f"unknown probe type {probe_type!r}; choose one of {sorted(_PROBES)}")
    return _PROBES[probe_type](rng, shape)


def _single(score_fn):
    """The score of one example: (x [...], t []) -> [...]."""
    return lambda x, t: score_fn(x[None], t[None])[0]


def _exact_divergence(fn, x):
    """tr(∂fn/∂x) from the full Jacobian (D forward passes: small D only)."""
    jac = jax.jacfwd(fn)(x).reshape(x.size, x.size)
    return jnp.trace(jac)


def _hutchinson_divergence(fn, x, v):
    """vᵀ (∂fn/∂x) v, an unbiased estimate of tr(∂fn/∂x) for E[v vᵀ] = I (one forward-mode product)."""
    return jnp.sum(v * jax.jvp(fn, (x,), (v,))[1])


# --- Score Fokker-Planck residual (SPEC §5). ---

def _fpe_residual_single(sde, s, x, t, v):
    """r(x, t) = ∂_t s - ∇_x[½ g² (∇·s + ||s||²) - ⟨f, s⟩] for one example, f = a(t) x (∇·f is constant in x)."""
    ds_dt = jax.jvp(lambda tt: s(x, tt), (t,), (jnp.ones_like(t),))[1]

    def potential(y):
        score_at = lambda z: s(z, t)
        div = _exact_divergence(score_at, y) if v is None else _hutchinson_divergence(score_at, y, v)
        sy = score_at(y)
        return 0.5 * sde.diffusion_sq(t) * (div + jnp.sum(sy**2)) - sde.drift_coef(t) * jnp.sum(y * sy)

    return ds_dt - jax.grad(potential)(x)


def fpe_residual_vector(rng, sde, score_fn, x, t, exact_divergence=False, hutchinson_type="rademacher", probe=None):
    """The score-FPE residual r(x, t) [B, ...] of SPEC §5, per example (vmap: no mixing across the batch).

    ∂_t s is a forward-mode derivative in t (jax.jvp), ∇·s the exact Jacobian trace or Hutchinson's vᵀ J v with
    one fixed probe v per example (`probe` [B, ...], else drawn from rng), and the outer ∇_x reverse mode. With
    Hutchinson, r̂ is unbiased over v (∇_x is linear) but its square is not: E_v||r̂||² = ||r||² +
    ¼ g⁴ E_v||∇_x(vᵀJv - tr J)||². The excess vanishes where J is constant in x, and for Rademacher probes also
    where J's x-dependent part is diagonal; otherwise it is positive even for the exact score. Use the exact
    divergence for the metric when D allows.
    """
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    s = _single(score_fn)
    if exact_divergence:
        return jax.vmap(lambda xi, ti: _fpe_residual_single(sde, s, xi, ti, None))(x, t)
    v = sample_probe(rng, x.shape, hutchinson_type) if probe is None else probe
    return jax.vmap(lambda xi, ti, vi: _fpe_residual_single(sde, s, xi, ti, vi))(x, t, v)


def fpe_residual(rng, sde, score_fn, x, t, exact_divergence=False, hutchinson_type="rademacher"):
    """Mean squared score-FPE residual per dimension ||r(x, t)||² / D [B] (SPEC §5); 0 for the exact score."""
    r = fpe_residual_vector(rng, sde, score_fn, x, t, exact_divergence, hutchinson_type)
    return jnp.mean(r.reshape(r.shape[0], -1) ** 2, axis=1)


# --- Conservativity (SPEC §5). ---

def _conservativity_exact_single(s, x, t):
    jac = jax.jacfwd(lambda y: s(y, t))(x).reshape(x.size, x.size)
    return jnp.sum((jac - jac.T) ** 2) / jnp.sum(jac**2)


def _conservativity_probes_single(s, x, t, u):
    """Σ_p ||(J - Jᵀ) u_p||² / Σ_p ||J u_p||² over probes u [P, ...]: J u by jvp, Jᵀ u by vjp."""
    f = lambda y: s(y, t)
    _, jvp_fn = jax.linearize(f, x)
    _, vjp_fn = jax.vjp(f, x)
    ju = jax.vmap(jvp_fn)(u)
    jtu = jax.vmap(lambda ui: vjp_fn(ui)[0])(u)
    return jnp.sum((ju - jtu) ** 2) / jnp.sum(ju**2)


def conservativity(rng, score_fn, x, t, n_probes=16, exact=False, probe_type="rademacher"):
    """||J - Jᵀ||²_F / ||J||²_F [B] of J = ∂s/∂x at (x, t), per example (SPEC §5); 0 for a gradient field.

    exact: from the full Jacobian (small D). Otherwise a ratio of probe averages: the SPEC's probe
    (vᵀJu - uᵀJv)² = (vᵀ(J - Jᵀ)u)² averaged over v analytically gives ||(J - Jᵀ)u||², whose mean over
    u is ||J - Jᵀ||²_F (and ||Ju||² that of ||J||²_F); the ratio of the two means over n_probes probes u is
    consistent (biased at O(1/n_probes)).
    """
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    s = _single(score_fn)
    if exact:
        return jax.vmap(lambda xi, ti: _conservativity_exact_single(s, xi, ti))(x, t)
    u = sample_probe(rng, (x.shape[0], n_probes) + x.shape[1:], probe_type)
    return jax.vmap(lambda xi, ti, ui: _conservativity_probes_single(s, xi, ti, ui))(x, t, u)


# --- Sample quality of low-dimensional samples. ---

def unit_directions(dim, n, seed):
    """n random unit vectors in R^dim as the columns of a [dim, n] float64 array (numpy, from `seed`)."""
    directions = np.random.default_rng(seed).normal(size=(dim, n))
    return directions / np.linalg.norm(directions, axis=0)


def sliced_w2(a, b, directions):
    """Sliced Wasserstein-2 distance sqrt(mean over the unit columns θ of W2²(θᵀa, θᵀb)) between two sample sets
    [n, D] of equal size n, for which the 1-D W2² is the mean square difference of the sorted projections."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_w2 needs equal sample sets, got {a.shape} and {b.shape}")
    pa, pb = np.sort(a @ directions, axis=0), np.sort(b @ directions, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


# --- Evaluators: run(rng, score_fn, data) yields (name, value). ---

def _perturb(rng, sde, x0, t):
    """x_t = m(t) x_0 + σ_t z ~ p_0t(· | x_0)."""
    mean, std = sde.marginal_prob(x0, t)
    return mean + batch_mul(std, jax.random.normal(rng, x0.shape, x0.dtype))


def _binned_times(rng, batch_size, n_bins, eps, T):
    """Stratified t on [eps, T]: example b lies in bin b mod n_bins, uniformly within it. Returns (t, bin)."""
    bins = jnp.arange(batch_size) % n_bins
    u = jax.random.uniform(rng, (batch_size,))
    return eps + (bins + u) * (T - eps) / n_bins, bins


def nll_evaluator(sde, config, prior_logp=None):
    """Test NLL by the probability-flow ODE (SPEC §4): yields "nll_nats_per_dim" (mean of -log p(x)/D over all
    examples), its standard error "nll_nats_per_dim_se", and the mean number of score evaluations "nfe".
    prior_logp replaces sde.prior_logp (e.g. the exact log p_T of a Gaussian mixture)."""
    e = config.eval

    def run(rng, score_fn, data):
        import likelihood  # lazily: evaluation.py is usable without the ODE solver's dependencies

        nll, nfe = [], []
        for x in data:
            rng, step_rng = jax.random.split(rng)
            logp, _, n = likelihood.log_likelihood(
                step_rng, sde, score_fn, x, exact_divergence=e.exact_divergence,
                hutchinson_type=e.get("hutchinson_type", "rademacher"), rtol=e.rtol, atol=e.atol, eps=e.eps,
                solver=e.get("solver", "tsit5"), prior_logp=prior_logp)
            nll.append(-np.asarray(logp, np.float64) / np.prod(x.shape[1:]))
            nfe.append(float(np.mean(n)))
        nll = np.concatenate(nll)
        yield "nll_nats_per_dim", float(nll.mean())
        yield "nll_nats_per_dim_se", float(nll.std(ddof=1) / np.sqrt(nll.size)) if nll.size > 1 else float("nan")
        yield "nfe", float(np.mean(nfe))

    return run


def fpe_evaluator(sde, config):
    """Mean squared FPE residual E||r||²/D at x_t ~ p_t, t stratified over config.eval.fpe_t_bins bins of
    [eps, T]: yields "fpe_residual" (all t) and "fpe_residual_t{k}" for bin k (bin 0 nearest eps)."""
    e = config.eval
    n_bins, eps = e.get("fpe_t_bins", 10), e.eps
    check_eps(eps, sde.T)

    def run(rng, score_fn, data):
        fn = jax.jit(lambda r, x, t: fpe_residual(r, sde, score_fn, x, t, e.exact_divergence,
                                                  e.get("hutchinson_type", "rademacher")))
        sums, counts = np.zeros(n_bins), np.zeros(n_bins)
        for x0 in data:
            rng, t_rng, z_rng, r_rng = jax.random.split(rng, 4)
            t, bins = _binned_times(t_rng, x0.shape[0], n_bins, eps, sde.T)
            res = np.asarray(fn(r_rng, _perturb(z_rng, sde, x0, t), t), np.float64)
            sums += np.bincount(np.asarray(bins), weights=res, minlength=n_bins)
            counts += np.bincount(np.asarray(bins), minlength=n_bins)
        yield "fpe_residual", float(sums.sum() / counts.sum())
        for k in range(n_bins):
            yield f"fpe_residual_t{k}", float(sums[k] / counts[k]) if counts[k] else float("nan")

    return run


def conservativity_evaluator(sde, config):
    """Mean of ||J - Jᵀ||²_F / ||J||²_F at x_t ~ p_t, t ~ U[eps, T]: yields "conservativity".
    Exact Jacobians when config.eval.exact_divergence (small D), else config.eval.conservativity_probes probes."""
    e = config.eval
    check_eps(e.eps, sde.T)

    def run(rng, score_fn, data):
        fn = jax.jit(lambda r, x, t: conservativity(r, score_fn, x, t, n_probes=e.get("conservativity_probes", 16),
                                                    exact=e.exact_divergence))
        total, count = 0.0, 0
        for x0 in data:
            rng, t_rng, z_rng, r_rng = jax.random.split(rng, 4)
            t = sde.sample_time(t_rng, x0.shape[0], e.eps)
            total += float(jnp.sum(fn(r_rng, _perturb(z_rng, sde, x0, t), t)))
            count += x0.shape[0]
        yield "conservativity", total / count

    return run


# name -> (the config.eval flag that enables it, its default, builder(sde, config)).
EVALUATORS = {
    "nll": ("enable_bpd", True, nll_evaluator),
    "fpe": ("enable_fpe", False, fpe_evaluator),
    "conservativity": ("enable_conservativity", False, conservativity_evaluator),
}


def get_evaluators(config, sde):
    """The evaluators enabled in config.eval (enable_bpd, enable_fpe, enable_conservativity), as run functions."""
    return [build(sde, config) for flag, default, build in EVALUATORS.values() if config.eval.get(flag, default)]


# ======================================================================================================================
# Sample-quality metrics: FID, IS, KID (SPEC §8).
#
# A feature extractor maps images [B, H, W, C] in [0, 1] to (features [B, d], logits [B, K]): the FID Inception-v3
# (models/inception.py; pool_3 features and the bias-free logits of the original Inception Score code) or the small
# digit classifier (models/digit_classifier.py; its penultimate features and logits, for the Fréchet classifier
# distance "fcd", kernel classifier distance "kcd" and classifier score). The metric math runs in float64 numpy on
# the host. Reference statistics (μ, Σ and, for KID, the features) come from a file or from held-out images.
# ======================================================================================================================

# --- Metrics. ---

def feature_statistics(features):
    """(μ [d], Σ [d, d]) in float64 of features [N, d]: the mean and the covariance normalized by N - 1."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature statistics need features [N >= 2, d]; got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(a):
    """The symmetric square root of a symmetric PSD matrix (eigenvalues below 0 by rounding set to 0)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2):
    """tr((Σ1 Σ2)^½) of two covariance matrices: the nuclear norm (sum of singular values) of Σ1^½ Σ2^½, float64.

    With C = Σ1^½ Σ2^½, Σ1 Σ2 = Σ1^½ (C Cᵀ) Σ1^-½ is similar to C Cᵀ (for singular Σ1 they still share their
    eigenvalues: AB and BA do), so the principal square root of Σ1 Σ2 has eigenvalues s_i(C) and trace Σ_i s_i(C).
    The symmetric roots come from numpy.linalg.eigh (rounding-level negative eigenvalues set to 0), the singular
    values from an SVD: nothing complex to discard, no ε·I retries when a covariance is singular (fewer samples
    than dimensions), and no square root of rounding noise (eigenvalues of C Cᵀ would carry ~√(ε) of it).
    """
    c = _psd_sqrt(np.asarray(sigma1, np.float64)) @ _psd_sqrt(np.asarray(sigma2, np.float64))
    return float(np.sum(np.linalg.svd(c, compute_uv=False)))


def fid_from_stats(mu1, sigma1, mu2, sigma2):
    """Fréchet distance ||μ1 - μ2||² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) between N(μ1, Σ1) and N(μ2, Σ2) (SPEC §8).

    The FID on Inception pool_3 statistics, the Fréchet classifier distance on a classifier's. float64; the
    square-root term by trace_sqrt_product. May come out below 0 by rounding (|value| ~ 1e-12 tr Σ) for equal
    statistics.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"Fréchet distance of statistics with different shapes: μ {mu1.shape} and {mu2.shape}, "
                         f"Σ {sigma1.shape} and {sigma2.shape}; were both computed with the same feature network?")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def inception_score(predictions, splits=10, from_logits=True):
    """exp(E_x KL(p(y|x) || p(y))) (SPEC §8) of class predictions [N, C] (logits, or probabilities with
    from_logits=False), as (mean, standard deviation) over `splits` consecutive parts of N // splits predictions
    each, p(y) being the part's mean prediction: the original Inception Score code's convention (it also drops
    the last N mod splits predictions). splits=1 gives the score of all predictions together."""
    p = np.asarray(predictions, np.float64)
    if p.ndim != 2 or splits < 1 or p.shape[0] < splits:
        raise ValueError(f"the score needs predictions [N >= splits, C] and splits >= 1; got {p.shape}, {splits}")
    if from_logits:
        p = special.softmax(p, axis=1)
    n = p.shape[0] // splits
    scores = []
    for part in np.split(p[:n * splits], splits):
        kl = np.sum(special.xlogy(part, part) - special.xlogy(part, part.mean(axis=0)), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def polynomial_kernel(x, y):
    """KID's kernel k(x, y) = (x·y / d + 1)³ [m, n] of features x [m, d] and y [n, d]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y):
    """The unbiased estimate of MMD² under polynomial_kernel (a U-statistic) from x [m, d] and y [n, d]:
    Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (n(n-1)) - 2 Σ_{i,j} k(x_i, y_j) / (mn)."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2.0 * polynomial_kernel(x, y).mean())


def _numpy_rng(rng):
    """A numpy Generator seeded by a jax key (host-side draws without compiling a jax sampler per shape)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())


def kid(rng, features1, features2, subsets=100, subset_size=1000):
    """Kernel Inception Distance (SPEC §8): the mean of mmd2_unbiased over `subsets` subset pairs, and its
    standard error s / √subsets (s the standard deviation over subsets), as (mean, standard error).

    Each subset takes m = min(subset_size, N1, N2) examples of each set without replacement, independently of the
    other subsets (so the standard error is the Monte-Carlo error of the subset average; it leaves out the
    sampling error of the two feature sets themselves). float64; `rng` a jax key.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if f1.ndim != 2 or f1.shape[1:] != f2.shape[1:] or m < 2 or subsets < 1:
        raise ValueError(f"KID needs features [N >= 2, d] of the same d and subsets >= 1; got {f1.shape}, "
                         f"{f2.shape}, subsets={subsets}")
    draws = _numpy_rng(rng)
    values = np.array([mmd2_unbiased(f1[draws.choice(f1.shape[0], m, replace=False)],
                                     f2[draws.choice(f2.shape[0], m, replace=False)]) for _ in range(subsets)])
    se = values.std(ddof=1) / np.sqrt(subsets) if subsets > 1 else float("nan")
    return float(values.mean()), float(se)


# --- Images to features. ---

def to_unit_range(images, data_range, levels=None):
    """Images in data_range -> [0, 1] (clipped); with `levels` K, as the integer image each stands for:
    k = min(floor(K u), K - 1) shown as k / (K - 1). A dataset's x = (k + u')/K, u' ∈ [0, 1), maps back to its k,
    and a sample is scored as its K-level image (a PNG for K = 256) would be."""
    low, high = data_range
    u = np.clip((np.asarray(images, np.float64) - low) / (high - low), 0.0, 1.0)
    if levels is None:
        return u.astype(np.float32)
    return (np.minimum(np.floor(levels * u), levels - 1) / (levels - 1)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """`apply(images [B, H, W, C] in [0, 1]) -> (features [B, d], logits [B, K])`; `names` of its (Fréchet
    distance, kernel distance, score) metrics; `identity` says which network and preprocessing made the features
    (stored with reference statistics and checked when they are reused)."""

    name: str
    identity: str
    apply: Callable
    names: tuple


def inception_extractor(config, levels=None):
    """The FID Inception (pool_3, logits_unbiased) with the weights file config.eval.inception_weights and
    config.eval.inception_preprocessing ("pytorch_fid" | "tf_graph"); any number of levels."""
    del levels
    path = config.eval.get("inception_weights")
    if not path:
        raise ValueError(f"FID / IS / KID need the Inception weights: download {inception.FID_WEIGHTS_URL} and set "
                         "--config.eval.inception_weights=/path/to/it, or score with the digit classifier: "
                         "--config.eval.sample_quality_features=classifier")
    variables = inception.load_fid_inception(path)
    preprocessing = config.eval.get("inception_preprocessing", "pytorch_fid")

    def apply(images):
        out = inception.inception_outputs(variables, images, preprocessing)
        return out["pool_3"], out["logits_unbiased"]

    identity = f"FID Inception-v3 sha256:{inception.FID_WEIGHTS_SHA256}, {preprocessing} preprocessing"
    return FeatureExtractor("inception", identity, apply, ("fid", "kid", "inception_score"))


def classifier_extractor(config, levels=None):
    """The digit classifier of config.eval.classifier_weights (scripts/train_digit_classifier.py), which must have
    been trained on images of the config's shape with the data's number of levels."""
    path = config.eval.get("classifier_weights")
    if not path:
        raise ValueError("the classifier metrics need --config.eval.classifier_weights: train them with "
                         f"python scripts/train_digit_classifier.py --dataset={config.data.dataset} --output=PATH")
    module, params, meta = digit_classifier.load_classifier(path)
    if module.noise_conditional:
        raise ValueError(f"classifier {path} is time-dependent (trained with --noise_config, for "
                         "--mode=class_conditional); the sample-quality metrics need one trained without it")
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    if meta["image_shape"] != shape or (levels is not None and int(meta["levels"]) != levels):
        raise ValueError(f"classifier {path} was trained on {meta['dataset']} ({meta['image_shape']} images of "
                         f"{meta['levels']} levels), the data are {shape} of {levels} levels; train one on "
                         f"{config.data.dataset} with scripts/train_digit_classifier.py")

    def apply(images):
        out = digit_classifier.classify(module, params, images)
        return out["features"], out["logits"]

    identity = f"digit classifier of {meta['dataset']} sha256:{inception.file_sha256(path)}"
    return FeatureExtractor("classifier", identity, apply, ("fcd", "kcd", "classifier_score"))


FEATURE_EXTRACTORS = {"inception": inception_extractor, "classifier": classifier_extractor}


def _feature_names(config):
    """The names in config.eval.sample_quality_features (comma-separated; default "inception"), all known."""
    names = [n.strip() for n in config.eval.get("sample_quality_features", "inception").split(",") if n.strip()]
    unknown = [n for n in names if n not in FEATURE_EXTRACTORS]
    if unknown or not names:
        raise ValueError(f"unknown sample-quality features {unknown}; set config.eval.sample_quality_features to a "
                         f"comma-separated list of {sorted(FEATURE_EXTRACTORS)}")
    return names


def get_feature_extractors(config, levels=None):
    """The extractors named in config.eval.sample_quality_features for data of `levels` levels (None: not
    checked); loads their weights."""
    return [FEATURE_EXTRACTORS[n](config, levels) for n in _feature_names(config)]


# config.eval count -> the least value the metrics can use (a covariance needs 2 samples, KID's U-statistic 2 per
# subset).
_SAMPLE_QUALITY_MINIMA = {"num_samples": 2, "kid_subsets": 1, "kid_subset_size": 2, "is_splits": 1}


def check_sample_quality_config(config):
    """ValueError (one line) for sample-quality settings that cannot work: data that are not images, unknown
    feature names or Inception preprocessing, counts below their minimum. Reads no file: the weights are loaded
    (and their errors raised) when sample_quality_evaluator is built."""
    if "image_size" not in config.data:
        raise ValueError(f"config.eval.enable_sample_quality needs image data; dataset {config.data.dataset!r} is "
                         "not an image set (FID / IS / KID score images)")
    _feature_names(config)
    preprocessing = config.eval.get("inception_preprocessing", "pytorch_fid")
    if preprocessing not in inception.PREPROCESSING:
        raise ValueError(f"config.eval.inception_preprocessing: unknown preprocessing {preprocessing!r}; choose one "
                         f"of {sorted(inception.PREPROCESSING)}")
    for key, least in _SAMPLE_QUALITY_MINIMA.items():
        if config.eval.get(key, least) < least:
            raise ValueError(f"config.eval.{key} must be >= {least}, got {config.eval[key]}")


def extract_features(extractor, images, batch_size):
    """(features [N, d], logits [N, K]) as float64 numpy of images [N, H, W, C] in [0, 1], batch_size at a time;
    the last batch is padded to batch_size (one compiled shape; each example is computed independently)."""
    images = np.asarray(images, np.float32)
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        padded = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), axis=0)])
        f, lg = extractor.apply(padded)
        features.append(np.asarray(f, np.float64)[:len(batch)])
        logits.append(np.asarray(lg, np.float64)[:len(batch)])
    return np.concatenate(features), np.concatenate(logits)


# --- Reference statistics. ---

@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """μ, Σ (float64) of reference features, the features themselves where kept (KID needs them) and the
    extractor identity that made them ("" for files of other codes, which do not record it)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[np.ndarray]
    identity: str


def stats_from_features(features, identity):
    """ReferenceStats of features [N, d] (kept, for KID) made by the extractor called `identity`."""
    mu, sigma = feature_statistics(features)
    return ReferenceStats(mu, sigma, np.asarray(features, np.float64), identity)


def save_reference_stats(path, stats):
    """An .npz with mu, sigma, identity and (if kept) features; pytorch-fid reads its mu and sigma as they are."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "identity": np.asarray(stats.identity)}
    if stats.features is not None:
        arrays["features"] = stats.features
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_reference_stats(path):
    """Reference statistics from an .npz in one of three layouts:
    - ours: mu [d], sigma [d, d], identity, optionally features [N, d];
    - pytorch-fid's (its --save-stats): mu, sigma;
    - the score-SDE code's assets/stats/<dataset>_stats.npz: pool_3 [N, 2048], the features (μ, Σ computed here).
    Files of other codes carry no identity: their features must come from the same network and preprocessing
    (the score-SDE files hold the training split's pool_3 from TF-GAN's TF-Hub Inception module, fed uint8 images
    scaled to [-1, 1]; which of our resize presets its resize matches is not established here)."""
    try:
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read reference statistics {path}: {error}") from error
    identity = str(data["identity"]) if "identity" in data else ""
    if "mu" in data and "sigma" in data:
        return ReferenceStats(data["mu"].astype(np.float64), data["sigma"].astype(np.float64),
                              data["features"].astype(np.float64) if "features" in data else None, identity)
    if "pool_3" in data:
        return stats_from_features(data["pool_3"], identity)
    raise ValueError(f"{path} holds {sorted(data)}; reference statistics need mu and sigma (ours, pytorch-fid's) or "
                     "pool_3 (the score-SDE code's stats files)")


def reference_stats(extractor, path, reference_images, batch_size):
    """The reference statistics of `extractor`: loaded from `path` if that file exists (its identity, when it
    records one, must be the extractor's), else computed from reference_images() (a function returning images
    [N, H, W, C] in [0, 1]) and written to `path` unless path is None."""
    if path and os.path.exists(path):
        stats = load_reference_stats(path)
        if stats.identity and stats.identity != extractor.identity:
            raise ValueError(f"reference statistics {path} were made by {stats.identity!r}, not by "
                             f"{extractor.identity!r}: delete the file to recompute it, or point elsewhere")
        if not stats.identity:
            logging.warning("reference statistics %s do not say which network made them; they are used as "
                            "if made by %s", path, extractor.identity)
        return stats
    stats = stats_from_features(extract_features(extractor, reference_images(), batch_size)[0], extractor.identity)
    if path:
        save_reference_stats(path, stats)
        logging.info("wrote %s reference statistics of %d images to %s", extractor.name, len(stats.features), path)
    return stats


# --- The evaluator. ---

def sample_quality_metrics(rng, features, logits, reference, names, config):
    """Yields (name, value): the Fréchet distance of the features to the reference; the kernel distance and its
    standard error ("<name>_se", config.eval.kid_subsets subsets of kid_subset_size) when the reference keeps its
    features; the score and its standard deviation over config.eval.is_splits parts ("<name>_std")."""
    e = config.eval
    fd, kd, score = names
    yield fd, fid_from_stats(*feature_statistics(features), reference.mu, reference.sigma)
    if reference.features is not None:
        mean, se = kid(rng, features, reference.features, e.get("kid_subsets", 100), e.get("kid_subset_size", 1000))
        yield kd, mean
        yield f"{kd}_se", se
    mean, std = inception_score(logits, min(e.get("is_splits", 10), len(logits)))
    yield score, mean
    yield f"{score}_std", std


def sample_quality_evaluator(config, data_range, levels):
    """FID / KID / IS (SPEC §8) for each extractor of config.eval.sample_quality_features: run(rng, samples, data)
    yields "num_samples" and each extractor's metrics (sample_quality_metrics) of the sample batches `samples` (an
    iterable of arrays in data_range, e.g. run_lib.sample_shards') against the reference statistics:
    config.eval.<extractor>_stats if that file exists, else computed from the held-out batches `data` (and written
    there when the field is set). They are made on the first run and reused by the later runs of the same
    evaluator (run_lib scores every checkpoint against the same test split).

    data_range and levels are the dataset's (samples and held-out images are scored as the integer images they
    stand for, to_unit_range); features are computed config.eval.batch_size at a time as the samples come. The
    extractors' weights are loaded here, so a missing file fails before anything is sampled.
    """
    e = config.eval
    extractors = get_feature_extractors(config, levels)
    references = {}     # extractor name -> ReferenceStats, from the first run

    def reference(extractor, data):
        if extractor.name not in references:
            images = lambda: to_unit_range(np.concatenate([np.asarray(x) for x in data]), data_range, levels)
            references[extractor.name] = reference_stats(extractor, e.get(f"{extractor.name}_stats"), images,
                                                         e.batch_size)
        return references[extractor.name]

    def run(rng, samples, data):
        outputs = [([], []) for _ in extractors]
        count = 0
        for x in samples:
            images = to_unit_range(np.asarray(x), data_range, levels)
            count += len(images)
            for extractor, (features, logits) in zip(extractors, outputs):
                f, lg = extract_features(extractor, images, e.batch_size)
                features.append(f)
                logits.append(lg)
        yield "num_samples", float(count)
        for i, (extractor, (features, logits)) in enumerate(zip(extractors, outputs)):
            ref = reference(extractor, data)
            kept = "μ, Σ only" if ref.features is None else f"{len(ref.features)} features"
            logging.info("%s metrics of %d samples; reference: %s, made by %s", extractor.name, count, kept,
                         ref.identity or "an unrecorded network")
            yield from sample_quality_metrics(jax.random.fold_in(rng, i), np.concatenate(features),
                                              np.concatenate(logits), ref, extractor.names, config)

    return run
