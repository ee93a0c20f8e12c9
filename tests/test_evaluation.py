"""Tests of evaluation.py against closed forms (SPEC §5, §9).

Ground truth for the FPE residual: the exact score of a Gaussian mixture solves the score Fokker-Planck
equation, so r = 0. For p_0 = N(0, c² I) the exact score is s = -x/V(t), V = m² c² + σ_t², and V' = 2 a V + g²
for all three SDEs. A field s' = -x/W(t) has ∂_t s' = x W'/W², ∇·s' = -D/W and ⟨f, s'⟩ = -a ||x||²/W, hence
r = x (W' - g² - 2 a W)/W². With W = V (1 + 0.2 t): W' - g² - 2 a W = 0.2 (g² t + V), so
||r||²/D = ||x||²/D · (0.2 (g² t + V) / W²)².

Conservativity: J of a gradient field is symmetric; for s + A x with A antisymmetric and s = -C⁻¹ (x - μ),
J = -C⁻¹ + A, J - Jᵀ = 2A and tr((C⁻¹)ᵀ A) = 0, so ||J - Jᵀ||²_F / ||J||²_F = 4 ||A||² / (||C⁻¹||² + ||A||²).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import datasets
import evaluation
import sde_lib
from configs.default_toy_configs import get_default_configs

SDES = {
    "vesde": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0),
    "vpsde": lambda: sde_lib.VPSDE(beta_min=0.1, beta_max=20.0),
    "subvpsde": lambda: sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0),
}
TIMES = jnp.tile(jnp.array([0.01, 0.1, 0.5, 0.9]), 4)    # several t in one batch of 16
# A general 3-D mixture: different full covariances, so J varies with x in every direction.
GMM = datasets.GaussianMixture(
    [0.3, 0.7], [[1.0, -0.5, 0.2], [-1.0, 0.8, 0.0]],
    np.stack([np.diag([0.3, 0.5, 0.4]), [[0.5, 0.2, 0.0], [0.2, 0.4, 0.1], [0.0, 0.1, 0.3]]]))
# Means on one axis, one shared isotropic covariance: the x-dependent part of J is along e_0 e_0ᵀ (diagonal).
AXIS_GMM = datasets.GaussianMixture.isotropic([0.2, 0.5, 0.3], [[-2.0, 0.0, 0.0], [0.5, 0.0, 0.0],
                                                                [2.0, 0.0, 0.0]], 0.5)
GAUSS = datasets.GaussianMixture.isotropic([1.0], [[0.0, 0.0, 0.0]], 0.7)


# Jitted per (sde, score_fn, options): compiling the whole residual is far cheaper than running it eagerly.
_fpe = jax.jit(evaluation.fpe_residual, static_argnums=(1, 2, 5, 6))
_conservativity = jax.jit(evaluation.conservativity, static_argnums=(1, 4, 5, 6))


def _perturbed_points(mixture, sde, t, seed=0):
    """x_t ~ p_t at the times t [B]."""
    x0 = mixture.sample(jax.random.PRNGKey(seed), t.shape[0])
    mean, std = sde.marginal_prob(x0, t)
    return mean + std[:, None] * jax.random.normal(jax.random.PRNGKey(seed + 1), x0.shape)


def _term_scale(sde, score_fn, x, t):
    """(||∂_t s||² + ||g² J s||²)/D per example: the size of the terms whose difference is r."""
    single = lambda xi, ti: score_fn(xi[None], ti[None])[0]
    dt = jax.vmap(lambda xi, ti: jax.jvp(lambda tt: single(xi, tt), (ti,), (1.0,))[1])(x, t)
    js = jax.vmap(lambda xi, ti: jax.jvp(lambda y: single(y, ti), (xi,), (single(xi, ti),))[1])(x, t)
    return jnp.mean(dt**2 + (sde.diffusion_sq(t)[:, None] * js) ** 2, axis=1)


@functools.partial(jax.jit, static_argnums=(1, 2, 5))
def _exact_and_perturbed(rng, sde, score_fn, x, t, exact):
    """Residual of score_fn and of the perturbed s · (1 + 0.2 t), and the size of the terms (one compile)."""
    perturbed = lambda y, s: score_fn(y, s) * (1 + 0.2 * s[:, None])
    return (evaluation.fpe_residual(rng, sde, score_fn, x, t, exact),
            evaluation.fpe_residual(rng, sde, perturbed, x, t, exact), _term_scale(sde, score_fn, x, t))


def _gauss_closed_form(sde, x, t):
    """||r||²/D of s' = -x/W, W = V (1 + 0.2 t), for p_0 = N(0, 0.7² I) (module docstring)."""
    v = sde.mean_coef(t) ** 2 * 0.7**2 + sde.marginal_std(t) ** 2
    w = v * (1 + 0.2 * t)
    return jnp.mean(x**2, axis=1) * (0.2 * (sde.diffusion_sq(t) * t + v) / w**2) ** 2


def _wrong_gauss_score(sde):
    return lambda y, t: GAUSS.score(y, t, sde) / (1 + 0.2 * t[:, None])     # -x / (V (1 + 0.2 t))


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_fpe_residual_exact_score_vanishes(sde_name):
    sde = SDES[sde_name]()
    x = _perturbed_points(GMM, sde, TIMES)
    res, res_p, scale = _exact_and_perturbed(None, sde, GMM.score_fn(sde), x, TIMES, True)
    # float32 cancellation between the terms: measured ≤ 1.3e-12 of their size; 1e-6 leaves room for other platforms.
    assert float(jnp.max(res / scale)) < 1e-6, np.asarray(res / scale)
    assert float(jnp.min(res_p / scale)) > 1e-4 and float(jnp.min(res_p / jnp.maximum(res, 1e-30))) > 100


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_fpe_residual_hutchinson_exact_score_vanishes(sde_name):
    # Rademacher: vᵀJv = tr J whenever the x-dependent part of J is diagonal (AXIS_GMM), so the estimate is exact.
    sde = SDES[sde_name]()
    x = _perturbed_points(AXIS_GMM, sde, TIMES)
    res, res_p, scale = _exact_and_perturbed(jax.random.PRNGKey(3), sde, AXIS_GMM.score_fn(sde), x, TIMES, False)
    assert float(jnp.max(res / scale)) < 1e-6, np.asarray(res / scale)       # measured ≤ 1.3e-11
    assert float(jnp.min(res_p / scale)) > 1e-4 and float(jnp.min(res_p / jnp.maximum(res, 1e-30))) > 100


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_fpe_residual_closed_form_of_a_wrong_score(sde_name):
    sde = SDES[sde_name]()
    x = _perturbed_points(GAUSS, sde, TIMES)
    res = _fpe(None, sde, _wrong_gauss_score(sde), x, TIMES, True, "rademacher")
    # float32 rounding only (measured ≤ 2.6e-6 relative).
    np.testing.assert_allclose(np.asarray(res), np.asarray(_gauss_closed_form(sde, x, TIMES)), rtol=1e-4)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_fpe_residual_hutchinson_closed_form_of_a_wrong_score(probe):
    # J = -I/W is constant in x, so vᵀJv has zero x-gradient and the Hutchinson residual is exact for any probe.
    sde = SDES["vpsde"]()
    x = _perturbed_points(GAUSS, sde, TIMES)
    res = _fpe(jax.random.PRNGKey(2), sde, _wrong_gauss_score(sde), x, TIMES, False, probe)
    np.testing.assert_allclose(np.asarray(res), np.asarray(_gauss_closed_form(sde, x, TIMES)), rtol=1e-4)


def test_fpe_hutchinson_residual_is_unbiased():
    # For a general mixture one probe's r̂ is not 0 for the exact score, but it is unbiased: E_v r̂ = r = 0.
    # In D = 3 the 8 sign vectors are the whole Rademacher distribution, so E_v r̂ is computed exactly.
    sde = SDES["vpsde"]()
    x = _perturbed_points(GMM, sde, TIMES)
    score_fn = GMM.score_fn(sde)
    signs = jnp.array(np.stack(np.meshgrid(*[[-1.0, 1.0]] * 3, indexing="ij"), -1).reshape(8, 3))
    per_probe = jax.jit(jax.vmap(lambda v: evaluation.fpe_residual_vector(
        None, sde, score_fn, x, TIMES, probe=jnp.broadcast_to(v, x.shape))))(signs)          # [8, B, D]
    single = jnp.mean(per_probe**2, axis=(0, 2))                      # E_v ||r̂||² / D
    mean = jnp.mean(jnp.mean(per_probe, axis=0) ** 2, axis=1)         # ||E_v r̂||² / D
    scale = _term_scale(sde, score_fn, x, TIMES)
    # The probe noise is real where the mixture is far from Gaussian (measured: up to 6e-2 of the terms' size at
    # t = 0.1, 1e-12 at t = 0.9), against ≤ 3e-13 for E_v r̂ ...
    assert float(jnp.max(single / scale)) > 1e-3, np.asarray(single / scale)
    # ... and averages out exactly (float32 cancellation only, as for the exact divergence).
    assert float(jnp.max(mean / scale)) < 1e-6, np.asarray(mean / scale)


def test_fpe_residual_images():
    # x [B, H, W, C]: the residual flattens per example; an isotropic Gaussian's score on 2x2x1 "images".
    sde = SDES["vpsde"]()
    flat = datasets.GaussianMixture.isotropic([1.0], [[0.0] * 4], 0.7)
    wrong = lambda y, t: (flat.score(y.reshape(-1, 4), t, sde) / (1 + 0.2 * t[:, None])).reshape(y.shape)
    x = _perturbed_points(flat, sde, TIMES)
    expected = _gauss_closed_form(sde, x, TIMES)   # c = 0.7 as for GAUSS; the formula holds in any D
    for exact in (True, False):
        res = _fpe(jax.random.PRNGKey(5), sde, wrong, x.reshape(-1, 2, 2, 1), TIMES, exact, "rademacher")
        assert res.shape == (16,)
        np.testing.assert_allclose(np.asarray(res), np.asarray(expected), rtol=1e-4)   # float32: measured 2.8e-6


def test_conservativity_of_exact_score_vanishes():
    sde = SDES["vpsde"]()
    x, score_fn = _perturbed_points(GMM, sde, TIMES), GMM.score_fn(sde)
    exact = _conservativity(None, score_fn, x, TIMES, 1, True, "rademacher")
    probes = _conservativity(jax.random.PRNGKey(6), score_fn, x, TIMES, 8, False, "rademacher")
    # J is symmetric up to float32 rounding (relative ~1e-7, squared ~1e-14).
    assert float(jnp.max(exact)) < 1e-10 and float(jnp.max(probes)) < 1e-10, (exact, probes)


def _antisymmetric_case():
    """An anisotropic Gaussian's exact score plus A x, with its closed-form ratio (module docstring)."""
    sde = SDES["vesde"]()
    cov = np.array([[0.5, 0.2, 0.0], [0.2, 0.4, 0.1], [0.0, 0.1, 0.3]])
    gauss = datasets.GaussianMixture([1.0], [[0.3, -0.2, 0.1]], cov[None])
    a = np.array([[0.0, 0.7, -0.3], [-0.7, 0.0, 1.1], [0.3, -1.1, 0.0]])
    field = lambda y, t: gauss.score(y, t, sde) + y @ jnp.asarray(a, jnp.float32).T
    t = jnp.full((4,), 0.2)
    x = _perturbed_points(gauss, sde, t)
    prec = np.linalg.inv(float(sde.mean_coef(t[0])) ** 2 * cov + float(sde.marginal_std(t[0])) ** 2 * np.eye(3))
    jac = -prec + a
    expected = 4 * np.sum(a**2) / (np.sum(prec**2) + np.sum(a**2))
    return field, x, t, jac, expected


def test_conservativity_closed_form_exact_jacobian():
    field, x, t, _, expected = _antisymmetric_case()
    got = np.asarray(_conservativity(None, field, x, t, 1, True, "rademacher"))
    np.testing.assert_allclose(got, expected, rtol=1e-5)          # float32 rounding of J


def test_conservativity_closed_form_probes():
    field, x, t, jac, expected = _antisymmetric_case()
    n = 2048
    got = np.asarray(_conservativity(jax.random.PRNGKey(7), field, x, t, n, False, "rademacher"))
    # Rademacher u: Var(uᵀPu) = 2 Σ_{i≠j} P_ij² for P = MᵀM, so each mean's relative s.e. is known;
    # the ratio's is at most their sum; 4 of those.
    def rel_se(m):
        p = m.T @ m
        return np.sqrt(2 * (np.sum(p**2) - np.sum(np.diag(p) ** 2)) / n) / np.trace(p)

    tol = 4 * (rel_se(jac - jac.T) + rel_se(jac))      # 9.6% here; measured errors ≤ 2.4%
    np.testing.assert_allclose(got, expected, rtol=tol)


# --- Evaluators. ---

def _eval_config(**fields):
    config = get_default_configs()
    config.eval.update(fields)
    return config


def test_fpe_evaluator_bins():
    sde, n_bins = SDES["vpsde"](), 4
    config = _eval_config(fpe_t_bins=n_bins)
    run = evaluation.fpe_evaluator(sde, config)
    data = [GAUSS.sample(jax.random.PRNGKey(11), 64)]
    metrics = dict(run(jax.random.PRNGKey(12), _wrong_gauss_score(sde), data))
    assert list(metrics) == ["fpe_residual"] + [f"fpe_residual_t{k}" for k in range(n_bins)]
    # Equal counts per bin (64 examples, 4 bins): the overall value is the mean of the bins.
    bins = [metrics[f"fpe_residual_t{k}"] for k in range(n_bins)]
    np.testing.assert_allclose(metrics["fpe_residual"], np.mean(bins), rtol=1e-6)
    # Bin k holds t ∈ [eps + k/4, eps + (k+1)/4) (up to the factor T - eps): recompute each bin from the closed
    # form at the evaluator's own draws (it splits its rng into 4 per batch).
    _, t_rng, z_rng, _ = jax.random.split(jax.random.PRNGKey(12), 4)
    t, which = evaluation._binned_times(t_rng, 64, n_bins, config.eval.eps, sde.T)
    assert np.array_equal(np.floor((np.asarray(t) - config.eval.eps) * n_bins / (sde.T - config.eval.eps)), which)
    expected = np.asarray(_gauss_closed_form(sde, evaluation._perturb(z_rng, sde, data[0], t), t))
    # float32 rounding only.
    np.testing.assert_allclose(bins, [expected[np.asarray(which) == k].mean() for k in range(n_bins)], rtol=1e-3)


def test_conservativity_evaluator():
    sde = SDES["vpsde"]()
    run = evaluation.conservativity_evaluator(sde, _eval_config(exact_divergence=False, conservativity_probes=4))
    data = [GMM.sample(jax.random.PRNGKey(13), 16)]
    assert dict(run(jax.random.PRNGKey(14), GMM.score_fn(sde), data))["conservativity"] < 1e-10
    a = jnp.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rotated = lambda y, t: GMM.score(y, t, sde) + y @ a.T
    assert dict(run(jax.random.PRNGKey(14), rotated, data))["conservativity"] > 0.1


def test_get_evaluators_follows_config():
    sde = SDES["vpsde"]()
    assert len(evaluation.get_evaluators(get_default_configs(), sde)) == 1             # nll only (enable_bpd)
    config = _eval_config(enable_bpd=False, enable_fpe=True, enable_conservativity=True, fpe_t_bins=2)
    runs = evaluation.get_evaluators(config, sde)
    data = [GMM.sample(jax.random.PRNGKey(15), 4)]
    names = [name for run in runs for name, _ in run(jax.random.PRNGKey(16), GMM.score_fn(sde), data)]
    assert names == ["fpe_residual", "fpe_residual_t0", "fpe_residual_t1", "conservativity"]


def test_probe_type_is_checked():
    with pytest.raises(ValueError, match="probe"):
        evaluation.sample_probe(jax.random.PRNGKey(0), (2, 3), "uniform")


def test_nll_evaluator_matches_exact_log_density():
    pytest.importorskip("likelihood")
    sde = SDES["vpsde"]()
    config = _eval_config(exact_divergence=True, batch_size=32)
    run = evaluation.nll_evaluator(sde, config, prior_logp=datasets.exact_prior_logp(GMM, sde))
    data = [GMM.sample(jax.random.PRNGKey(17), 32), GMM.sample(jax.random.PRNGKey(18), 32)]
    metrics = dict(run(jax.random.PRNGKey(19), GMM.score_fn(sde), data))
    x = jnp.concatenate(data)
    exact = -np.asarray(GMM.log_prob(x, jnp.full((64,), config.eval.eps), sde), np.float64) / GMM.dim
    # Exact score and exact prior: only the ODE solver's tolerance (rtol = atol = 1e-5) separates them
    # (measured: 1.2e-6 nats/dim apart).
    np.testing.assert_allclose(metrics["nll_nats_per_dim"], exact.mean(), atol=1e-4)
    np.testing.assert_allclose(metrics["nll_nats_per_dim_se"], exact.std(ddof=1) / 8, rtol=1e-3)
    assert metrics["nfe"] > 0


def test_sliced_w2_of_a_shifted_set_is_the_mean_projected_shift():
    # Shifting a set by c moves every projection by θᵀc, so W2²(θᵀa, θᵀ(a + c)) = (θᵀc)² exactly; order is irrelevant.
    a = np.random.default_rng(0).normal(size=(500, 3))
    c = np.array([0.5, -1.0, 2.0])
    directions = evaluation.unit_directions(3, 64, seed=1)
    np.testing.assert_allclose(np.linalg.norm(directions, axis=0), 1.0, rtol=1e-12)
    want = np.sqrt(np.mean((directions.T @ c) ** 2))
    shuffled = (a + c)[np.random.default_rng(2).permutation(500)]
    assert evaluation.sliced_w2(a, shuffled, directions) == pytest.approx(want, rel=1e-10)
    assert evaluation.sliced_w2(a, a, directions) == 0.0
    with pytest.raises(ValueError, match="equal"):
        evaluation.sliced_w2(a, a[:10], directions)
