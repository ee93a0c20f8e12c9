"""Samplers driven by the exact Gaussian-mixture score must reproduce the mixture (SPEC §6, §7, §9).

Ground truth: with s = ∇ log p_t exact, every sampler's output should be distributed as p_0 (up to the tiny
noise σ_eps at the final time eps: variance ≤ 1.1e-4, mean factor m(eps) ≥ 1 - 6e-5, i.e. < 2 % of any tolerance
below, so the reference is p_0 itself). The 2-D mixture has weights (0.3, 0.7) and means 3.6 apart; its
components are ≥ 4.3 of their standard deviations from the nearest-mean boundary, so assigning samples to the
nearest mean misclassifies < 1e-5 of them.

Tolerances are K_SE = 4 Monte-Carlo standard errors per checked number (two-sided p ≈ 6e-5 each), with the standard
error stated next to each check. The seeds are fixed, so the tests are deterministic; the measured worst |z| over
all checks of each sampler is listed in SAMPLERS.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import datasets
import sampling
import sde_lib
from configs import default_toy_configs

MIXTURE = datasets.GaussianMixture(
    weights=[0.3, 0.7],
    means=[[-2.1, -1.4], [0.9, 0.6]],
    covs=[[[0.15, 0.05], [0.05, 0.1]], [[0.1, -0.03], [-0.03, 0.08]]],
)
N_SAMPLES = 4000
K_SE = 4.0


def _assert_close(name, got, want, se, allowance=0.0):
    err = np.abs(np.asarray(got) - np.asarray(want))
    assert np.all(err < K_SE * np.asarray(se) + allowance), (
        f"{name}: got {got}, want {want}, |z| = {err / se} (tolerance {K_SE} standard errors + {allowance})")


def _cov_se(cov, n):
    """s.e. of the entries of a Gaussian's sample covariance: sqrt((Σ_ii Σ_jj + Σ_ij²) / n)."""
    var = np.diag(cov)
    return np.sqrt((np.outer(var, var) + cov**2) / n)


def _moments_with_weight_shift(delta):
    """Overall (mean, covariance) of the mixture with weights (w_0 + delta, w_1 - delta)."""
    shifted = datasets.GaussianMixture(MIXTURE.weights + np.array([delta, -delta]), MIXTURE.means, MIXTURE.covs)
    return shifted.marginal_moments()


def assert_reproduces_mixture(x, weight_bias=0.0, var_bias=0.0):
    """Overall mean and covariance, component weights, and each component's mean and covariance.

    Tolerance: K_SE standard errors, plus, for a sampler with a known systematic error, an allowance for a weight
    error up to weight_bias (and what it does to the overall moments) and a relative covariance error up to var_bias.
    """
    x = np.asarray(x, np.float64)
    n = len(x)
    assert np.all(np.isfinite(x))
    mean, cov = MIXTURE.marginal_moments()
    shifted = [_moments_with_weight_shift(d) for d in (-weight_bias, weight_bias)]
    mean_allow = np.max([np.abs(m - mean) for m, _ in shifted], axis=0)
    cov_allow = np.max([np.abs(c - cov) for _, c in shifted], axis=0) + var_bias * np.abs(cov)
    # Mean: s.e. sqrt(Σ_ii / n). Covariance of the (non-Gaussian) mixture: s.e. from the samples' own products.
    _assert_close("overall mean", x.mean(0), mean, np.sqrt(np.diag(cov) / n), mean_allow)
    xc = x - x.mean(0)
    products = xc[:, :, None] * xc[:, None, :]
    _assert_close("overall covariance", np.cov(x.T), cov, products.std(0) / np.sqrt(n), cov_allow)
    comp = np.argmin(((x[:, None, :] - MIXTURE.means[None]) ** 2).sum(-1), axis=1)
    for k, (w, mu, c) in enumerate(zip(MIXTURE.weights, MIXTURE.means, MIXTURE.covs)):
        xk = x[comp == k]
        # Weight: binomial s.e. sqrt(w (1 - w) / n). Component moments: Gaussian s.e. with n_k samples.
        _assert_close(f"weight {k}", len(xk) / n, w, np.sqrt(w * (1 - w) / n), weight_bias)
        _assert_close(f"mean {k}", xk.mean(0), mu, np.sqrt(np.diag(c) / len(xk)))
        _assert_close(f"covariance {k}", np.cov(xk.T), c, _cov_se(c, len(xk)), var_bias * np.abs(c))


class CountingScore:
    """The exact score of the mixture's p_t (SPEC §9) that counts its batch evaluations on the host."""

    def __init__(self, sde):
        self.score_fn, self.calls = MIXTURE.score_fn(sde), 0

    def _count(self, _):
        self.calls += 1

    def __call__(self, x, t):
        jax.debug.callback(self._count, t[0])
        return self.score_fn(x, t)


def sample_counted(sde, shape, rng=0, **kwargs):
    """sampling.sample with the SDE's shared counting score; asserts nfe = the score evaluations made."""
    score = SCORES[sde]
    score.calls = 0
    x, nfe = sampling.sample(jax.random.PRNGKey(rng), sde, score, shape, **kwargs)
    x = np.asarray(x)
    assert x.shape == shape and nfe == score.calls
    return x, nfe


VP, SUBVP, VE = sde_lib.VPSDE(N=200), sde_lib.subVPSDE(N=300), sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=200)
ALD_VE = sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=10)
# One score object per SDE, so that tests with the same options share the compiled sampler.
SCORES = {sde: CountingScore(sde) for sde in (VP, SUBVP, VE, ALD_VE)}

# (sde, sample kwargs). N = 200 steps (300 for sub-VP, whose 200-step samples carry a visible discretization bias:
# a component variance 3.4 s.e. off; 1.9 s.e. at N = 300). VE: σ_max = 10 ≫ the data spread (means 3.6 apart),
# so the prior N(0, σ_max²) matches p_T. Measured worst |z| over the 16 checks: in the comment.
SAMPLERS = {
    "vp-pc-langevin": (VP, dict(method="pc", predictor="reverse_diffusion", corrector="langevin")),  # 2.5
    "vp-euler": (VP, dict(method="euler")),  # 2.7
    "vp-ancestral": (VP, dict(method="pc", predictor="ancestral", corrector="none")),  # 2.7
    "vp-ode": (VP, dict(method="ode")),  # 2.2
    "subvp-euler": (SUBVP, dict(method="euler")),  # 1.9
    "subvp-reverse_diffusion": (SUBVP, dict(method="pc", predictor="reverse_diffusion", corrector="none")),  # 2.0
    "subvp-ode": (SUBVP, dict(method="ode")),  # 2.2
    "ve-pc-langevin": (VE, dict(method="pc", predictor="reverse_diffusion", corrector="langevin")),  # 1.8
    "ve-ancestral": (VE, dict(method="pc", predictor="ancestral", corrector="none")),  # 1.7
    "ve-ode": (VE, dict(method="ode")),  # 1.7
    # Fixed-step probability-flow ODE solvers at 30 steps (60 score evaluations). VE on a grid uniform in t reaches
    # |z| = 3.7 (its steps crowd where σ is large; a bias of the grid, not noise), so VE runs on EDM's grid.
    "vp-ode-heun-edm": (VP, dict(method="ode", solver="heun", n_steps=30, schedule="edm")),  # 2.1
    "vp-ode-midpoint-uniform": (VP, dict(method="ode", solver="midpoint", n_steps=30)),  # 2.1
    "ve-ode-heun-edm": (VE, dict(method="ode", solver="heun", n_steps=30, schedule="edm")),  # 2.9
    # EDM's stochastic sampler, 100 Heun steps: its default churn (γ = √2 - 1 on σ̃ in [0.05, 50]), and churn on
    # every step. Each churned step lifts σ̃ by 41 % and steps down twice as far, so at 30 steps the component
    # variances come out ~10 % high (|z| 5-6); that bias falls with the step size.
    "vp-edm": (VP, dict(method="edm", n_steps=100)),  # 2.6
    "subvp-edm": (SUBVP, dict(method="edm", n_steps=100)),  # 2.4
    "ve-edm": (VE, dict(method="edm", n_steps=100)),  # 2.0
    "vp-edm-full-churn": (VP, dict(method="edm", n_steps=100, churn=1e9, churn_range=(0.0, 1e9))),  # 3.1
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_reproduces_mixture(name):
    sde, kwargs = SAMPLERS[name]
    x, _ = sample_counted(sde, (N_SAMPLES, 2), **kwargs)
    assert_reproduces_mixture(x)


def test_annealed_langevin_reproduces_mixture_up_to_its_bias():
    """NCSN's ALD (SPEC §6): σ_min = 0.01, σ_max = 10, L = 10 levels, T = 100 steps each, ε = 3e-5.

    ε only enters through ε/σ_L² (the step relative to the level's variance), so the paper's 2e-5 is not "for
    images" but a relative step of 0.2. ALD is not exact at finite steps: a sweep over ε ∈ [2e-6, 2e-4] (4 000 to
    20 000 samples) found no ε that reproduces the mixture within Monte-Carlo error. Small ε under-mixes; large ε
    inflates the variance (unadjusted Langevin). Every ε leaves the minority weight too high (0.315-0.33 instead
    of 0.3, also with 20 levels or 1000 steps per level). The weights freeze at the level where the modes
    separate: each mode's basin then holds its own mass plus the other mode's overlapping tail, and the later,
    smaller-σ levels cannot hop the barrier to undo it. ε = 3e-5 had the smallest combined error: weight
    +0.024, component variances +6 to +9 %. Allowances: weight 0.035, variances 13 %, on top of 4 s.e. A
    wrong formula (no σ_i² scaling, α instead of α/2, no noise) misses by far more.
    """
    x, nfe = sample_counted(ALD_VE, (N_SAMPLES, 2), method="ald", step_lr=3e-5, n_steps_each=100)
    assert nfe == 10 * 100 + 1
    assert_reproduces_mixture(x, weight_bias=0.035, var_bias=0.13)


PC_NONE_ALD = dict(method="pc", predictor="none", corrector="ald", n_steps=3, snr=0.2)


def test_pc_nfe_counts_corrector_steps():
    """nfe = N (predictor nfe + n_steps × corrector nfe) = 10 (0 + 3 × 1): "none" counts 0."""
    assert sample_counted(ALD_VE, (8, 2), **PC_NONE_ALD)[1] == 10 * 3


ODE_FAST = dict(method="ode", rtol=1e-3, atol=1e-3, denoise=True)


def test_ode_nfe_is_small_and_the_map_is_deterministic():
    """At rtol = atol = 1e-3 the adaptive solve needs ≪ 1000 evaluations.

    Measured: 68 = 6 × 11 steps + 1, + 1 for the denoising step; the bound 200 leaves room for other platforms.
    """
    x1, nfe = sample_counted(VP, (500, 2), rng=2, **ODE_FAST)
    assert 0 < nfe < 200
    x2, nfe2 = sample_counted(VP, (500, 2), rng=2, **ODE_FAST)
    x3, _ = sample_counted(VP, (500, 2), rng=3, **ODE_FAST)
    np.testing.assert_array_equal(x1, x2)
    assert nfe2 == nfe
    assert np.abs(x1 - x3).mean() > 0.1


def test_get_sampling_fn_reads_the_config():
    """The config's fields reach the sampler: the same samples as the direct call with those options (PC; adaptive
    ODE with ode_rtol / ode_atol; fixed-step ODE with ode_solver / ode_steps / ode_schedule / ode_rho; EDM's
    sampler with edm_steps / edm_churn / edm_churn_range / edm_noise and ode_rho)."""
    config = default_toy_configs.get_default_configs()
    config.sampling.update(method="pc", predictor="none", corrector="ald", n_steps_each=3, snr=0.2)
    x, nfe = sampling.get_sampling_fn(config, ALD_VE, (8, 2))(jax.random.PRNGKey(0), SCORES[ALD_VE])
    want, want_nfe = sample_counted(ALD_VE, (8, 2), **PC_NONE_ALD)
    np.testing.assert_array_equal(x, want)
    assert nfe == want_nfe
    config.sampling.update(method="ode", ode_rtol=1e-3, ode_atol=1e-3)
    x, nfe = sampling.get_sampling_fn(config, VP, (500, 2))(jax.random.PRNGKey(2), SCORES[VP])
    want, want_nfe = sample_counted(VP, (500, 2), rng=2, **ODE_FAST)
    np.testing.assert_array_equal(x, want)
    assert nfe == want_nfe
    config.sampling.update(ode_solver="heun", ode_steps=7, ode_schedule="edm", ode_rho=5.0)
    x, nfe = sampling.get_sampling_fn(config, VP, (8, 2))(jax.random.PRNGKey(2), SCORES[VP])
    want, want_nfe = sample_counted(VP, (8, 2), rng=2, method="ode", solver="heun", n_steps=7, schedule="edm",
                                    rho=5.0, denoise=True)
    np.testing.assert_array_equal(x, want)
    assert nfe == want_nfe == 2 * 7 + 1
    config.sampling.update(method="edm", edm_steps=6, edm_churn=3.0, edm_churn_range=(0.1, 5.0), edm_noise=1.01)
    x, nfe = sampling.get_sampling_fn(config, VP, (8, 2))(jax.random.PRNGKey(2), SCORES[VP])
    want, want_nfe = sample_counted(VP, (8, 2), rng=2, method="edm", n_steps=6, churn=3.0, churn_range=(0.1, 5.0),
                                    noise_scale=1.01, rho=5.0, denoise=True)
    np.testing.assert_array_equal(x, want)
    assert nfe == want_nfe == 2 * 6 + 1


def test_langevin_alpha_is_ddpm_alpha_for_vp_and_one_for_ve():
    """α_i = 1 - β_i with β_{N-1} = β_max / N at t = T (SPEC §1 DDPM discretization); α = 1 for VE."""
    t = jnp.array([1.0, 0.0])
    np.testing.assert_allclose(sde_lib.VPSDE(0.1, 20.0, N=1000).langevin_alpha(t),
                               [1 - 20.0 / 1000, 1 - 0.1 / 1000], rtol=1e-6)
    np.testing.assert_allclose(VE.langevin_alpha(t), [1.0, 1.0])


def _scaled_score(scale, x, t):
    return -scale * x


def test_partial_score_fn_reuses_the_compiled_sampler():
    """A jax.tree_util.Partial score with new arrays compiles once; the arrays are traced, not baked in."""
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=10)
    before = sampling._pc_sample._cache_size()
    xs = [sampling.sample(jax.random.PRNGKey(0), sde, jax.tree_util.Partial(_scaled_score, jnp.float32(s)), (4, 2),
                          method="euler")[0] for s in (1.0, 2.0)]
    assert sampling._pc_sample._cache_size() == before + 1
    assert not np.allclose(xs[0], xs[1])


# --- Fixed-step probability-flow ODE solvers: time grids and exact NFE. ---
SCHEDULE_SDES = {"vp": VP, "subvp": SUBVP, "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=1000)}


def test_edm_sigmas_follow_the_karras_formula():
    """σ_i = (σ_max^{1/ρ} + i/(N-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ at EDM's σ ∈ [0.002, 80], N = 18, ρ = 7, computed
    here in float64. Tolerance: float32 rounding, amplified ρ-fold by the power (< 1e-6 relative)."""
    i = np.arange(18)
    want = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sampling.edm_sigmas(0.002, 80.0, 18, 7.0), want, rtol=2e-6)


@pytest.mark.parametrize("name", list(SCHEDULE_SDES))
def test_edm_time_grid_maps_back_to_t(name):
    """The EDM grid's noise-to-signal ratios σ_t/m(t) are edm_sigmas between those of eps and T; its end points are
    exactly T and eps; t → σ̃(t) → t is the identity. Tolerances: float32 rounding through exp / log / sqrt, which
    for sub-VP's σ̃ ≈ B(t) ~ 1e-4 near eps reaches 2.3e-6 relative (4e-6 allowed; ≤ 2e-7 absolute in t)."""
    sde, eps = SCHEDULE_SDES[name], 1e-3
    ts = np.asarray(sampling.time_grid(sde, 20, eps, schedule="edm"))
    assert ts[0] == sde.T and ts[-1] == np.float32(eps) and np.all(np.diff(ts) < 0)
    ratio = lambda t: sampling.noise_to_signal(sde, jnp.float32(t))
    want = sampling.edm_sigmas(ratio(eps), ratio(sde.T), 21, 7.0)
    np.testing.assert_allclose(sampling.noise_to_signal(sde, jnp.asarray(ts)), want, rtol=4e-6)
    t = jnp.linspace(eps, 1.0, 101)
    np.testing.assert_allclose(sampling.noise_to_signal_inverse(sde, sampling.noise_to_signal(sde, t)), t,
                               rtol=0, atol=1e-6)


class UnregisteredVPSDE(sde_lib.VPSDE):
    """A VPSDE subclass without a registered closed-form inverse: noise_to_signal_inverse bisects."""


def test_bisection_inverse_matches_the_closed_form():
    """The bisection fallback equals VP's closed form B⁻¹(log(1 + σ̃²)) within float32 resolution of t (1e-6)."""
    sde = UnregisteredVPSDE()
    sigma = sampling.noise_to_signal(VP, jnp.linspace(1e-3, 1.0, 101))
    np.testing.assert_allclose(sampling.noise_to_signal_inverse(sde, sigma),
                               sampling.noise_to_signal_inverse(VP, sigma), rtol=0, atol=1e-6)


def test_uniform_time_grid_is_linspace():
    np.testing.assert_allclose(sampling.time_grid(VE, 4, 1e-3), [1.0, 0.75025, 0.5005, 0.25075, 0.001], rtol=1e-6)


@pytest.mark.parametrize("solver, per_step", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_fixed_step_ode_nfe(solver, per_step):
    """N steps cost N (Euler) or 2N (Heun, midpoint: two stages, no first-same-as-last) score evaluations, counted
    on the host by sample_counted; uniform and EDM grids of the same N share one compiled solve."""
    before = sampling._ode_sample._cache_size()
    for schedule in ("uniform", "edm"):
        _, nfe = sample_counted(VP, (8, 2), method="ode", solver=solver, n_steps=7, schedule=schedule)
        assert nfe == per_step * 7
    assert sampling._ode_sample._cache_size() == before + 1


def test_edm_sampler_nfe_and_its_deterministic_limit():
    """2 score evaluations per Heun step + 1 for the denoising step. With churn = 0 the sampler is a Heun solve of
    the probability-flow ODE in (σ̃, y = x/m) from the same x_T as ode_sample: 200 steps land where Tsit5 at 1e-6
    does (mean difference < 1e-3 and max < 2e-2 on data of scale ~1: the max is set by the few points near the
    boundary between the components, where the flow's map is steep; a wrong m or σ̃ map moves points by O(0.1)),
    and churn moves them."""
    _, nfe = sample_counted(VP, (8, 2), method="edm", n_steps=7)
    assert nfe == 15
    _, nfe = sample_counted(VP, (8, 2), method="edm", n_steps=7, denoise=False)
    assert nfe == 14
    for sde in (VP, VE):
        ode, _ = sample_counted(sde, (64, 2), method="ode", rtol=1e-6, atol=1e-6)
        heun, _ = sample_counted(sde, (64, 2), method="edm", n_steps=200, churn=0.0, denoise=False)
        churned, _ = sample_counted(sde, (64, 2), method="edm", n_steps=200, denoise=False)
        assert np.abs(heun - ode).mean() < 1e-3 and np.abs(heun - ode).max() < 2e-2, np.abs(heun - ode).max()
        assert np.abs(churned - ode).mean() > 0.1


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="heun"), "unknown sampling method 'heun'; choose one of \\['ald', 'edm', 'euler', 'langevin', 'ode', 'pc'\\]"),
    (dict(method="pc", predictor="leapfrog"), "unknown predictor 'leapfrog'; choose one of"),
    (dict(method="pc", corrector="hmc"), "unknown corrector 'hmc'; choose one of"),
    (dict(method="ode", solver="rk4"),
     "unknown ODE solver 'rk4'; choose one of \\['dopri5', 'euler', 'heun', 'midpoint', 'tsit5'\\]"),
    (dict(method="ode", solver="heun", schedule="cosine"), "unknown time schedule 'cosine'; choose one of"),
    (dict(method="ode", solver="euler", n_steps=0), "n_steps \\(fixed ODE steps\\) must be >= 1"),
    (dict(method="ald", init="gaussian"), "unknown initial noise 'gaussian'"),
    (dict(method="edm", churn=-1.0), "the EDM sampler needs n_steps >= 1, churn >= 0"),
    (dict(method="pc", predictor="ancestral", probability_flow=True), "use probability_flow=False"),
    (dict(method="pc", eps=0.0), "eps must lie in"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampling.sample(jax.random.PRNGKey(0), VE, MIXTURE.score_fn(VE), (4, 2), **kwargs)


def test_unknown_method_in_config_raises_value_error():
    config = default_toy_configs.get_default_configs()
    config.sampling.method = "ddim"
    with pytest.raises(ValueError, match="unknown sampling method 'ddim'"):
        sampling.get_sampling_fn(config, VP, (4, 2))


# --- Langevin at one time: the sampler of an energy-based model. ---

def test_langevin_sampler_reaches_the_ula_stationary_gaussian():
    """E = x²/(2v): the unadjusted chain x ← x(1 - ε²/(2v)) + ε z has the stationary variance v / (1 - ε²/(4v))
    (1.0667 at v = 1, ε = 0.5; the other step conventions would give 0.571 or 1.0). 200 steps contract the U[0, 1]
    start by 0.875^200; 20,000 chains x 2 coordinates give the variance to s.e. 0.0075 and the mean to 0.0073.
    The score -x/(4t) is this one only at the sampler's time t = sampling.eps = 0.25."""
    v, step = 1.0, 0.5
    config = default_toy_configs.get_default_configs()
    config.sampling.method, config.sampling.n_steps_each, config.sampling.eps = "langevin", 200, 0.25
    config.sampling.langevin_step_size, config.sampling.langevin_init = step, "uniform"
    sampler = sampling.get_sampling_fn(config, VP, (20000, 2))
    x, nfe = sampler(jax.random.PRNGKey(3), lambda y, t: -y / (4 * t[:, None]))
    assert nfe == 200
    x = np.asarray(x, np.float64).ravel()
    want = v / (1 - step**2 / (4 * v))
    _assert_close("ULA variance", x.var(), want, want * np.sqrt(2 / x.size))
    _assert_close("ULA mean", x.mean(), 0.0, np.sqrt(want / x.size))

