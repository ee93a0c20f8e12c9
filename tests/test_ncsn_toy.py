"""The toy experiment of NCSN (Song & Ermon 2019, §3.2.2 and Figure 3; SPEC §6, §9) with exact scores.

p_data = 1/5 N((-5, -5), I) + 4/5 N((5, 5), I), the paper's mixture. Its settings (the paper's text, confirmed in
ermongroup/ncsn runners/toy_runner.py, annealed_sampling_exp): plain Langevin x ← x + (ε/2) ∇ log p_data(x) + √ε z
with ε = 0.1, T = 1000 steps from U[-8, 8]²; annealed Langevin on L = 10 geometric σ from 20 to 1, α_i = ε σ_i²/σ_L²
with ε = 0.1, T = 100 steps per level. The scores are exact (datasets.GaussianMixture): of p_data for plain
Langevin, of p_σ = 1/5 N((-5, -5), (1 + σ²) I) + 4/5 N((5, 5), (1 + σ²) I) for the annealed one, which is
sampling.ald_sample on sde_lib.VESDE(σ_min=1, σ_max=20, N=10) (its discrete levels are the paper's σ_i).

A sample belongs to the small mode when x + y < 0: the modes are 7.07 standard deviations from that line, so
< 1e-11 of each mode's mass is misassigned. The weights are binomial counts, s.e. sqrt(w (1 - w) / n).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

import datasets
import sampling
import sde_lib
from configs import default_toy_configs

TOY = datasets.GaussianMixture.isotropic([0.2, 0.8], [[-5.0, -5.0], [5.0, 5.0]], 1.0)
ANNEALED = sde_lib.VESDE(sigma_min=1.0, sigma_max=20.0, N=10)
EPS = 0.1
N_SAMPLES = 4000
K_SE = 4.0
# Unadjusted Langevin x ← x + (α/2) s + √α z on N(μ, v I) has the stationary variance v / (1 - α/(4v)); at the last
# level (σ_L = 1, α = ε, v = 1 + σ_L² = 2) that is 2.0253, what ALD samples without the final denoising step.
LAST_LEVEL_VAR = 2.0 / (1.0 - EPS / 8.0)


def _small_mode(x):
    return np.asarray(x).sum(axis=1) < 0.0


@functools.partial(jax.jit, static_argnames="n_steps")
def _plain_langevin(rng, x, step, n_steps):
    """Langevin dynamics with the data score (the paper's eq. 2): ALD with a single level."""
    def update(i, x):
        z = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
        return x + 0.5 * step * TOY.score(x, None, None) + jnp.sqrt(step) * z

    return jax.lax.fori_loop(0, n_steps, update, x)


def test_plain_langevin_keeps_the_starting_split_of_the_modes():
    """Plain Langevin cannot move mass between modes 14 apart: each chain stays in the basin it starts in, so the
    small mode keeps the ~1/2 of U[-8, 8]² that lies on its side of the saddle (x + y = -0.14, where the score
    vanishes between the modes) instead of 1/5.

    Measured (seed 0): 0.489 in the small mode, 0.4885 of the starting points beyond the saddle; 99.1 % of the chains
    end on their starting side (the early noise carries some that start near the saddle across, both ways).
    Tolerances: the fraction within 0.02 of the starting split (twice the 0.9 % of chains that cross at all), and
    more than 0.25 away from 1/5.
    """
    init_rng, rng = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.uniform(init_rng, (N_SAMPLES, 2), minval=-8.0, maxval=8.0)
    x = np.asarray(_plain_langevin(rng, x0, EPS, 1000))
    start = np.asarray(x0).sum(axis=1) < -0.14
    small = _small_mode(x).mean()
    print(f"plain Langevin: small-mode fraction {small:.4f} (start beyond the saddle {start.mean():.4f}, "
          f"chains that stayed {np.mean(_small_mode(x) == start):.4f}; target 0.2)")
    assert np.all(np.isfinite(x))
    assert abs(small - start.mean()) < 0.02
    assert abs(small - 0.2) > 0.25


def test_annealed_langevin_recovers_the_weights():
    """ALD (sampling.ald_sample) with the paper's levels and steps puts 1/5 of the samples in the small mode, and
    samples each mode as p_{σ_L}'s component N(μ_k, 2 I) (no denoising step here).

    Measured (seed 0): 0.2145; seeds 1, 2: 0.221, 0.219 (n = 10 000, seeds 0-2: 0.215, 0.218, 0.214). ALD carries a
    small systematic excess, +0.016 ± 0.002 over those 30 000 samples: the weights freeze at the level where the
    modes separate (σ_i ≈ 3-4, where 0.6 Φ(-7.07 / sqrt(1 + σ²)) ≈ 0.016 of mass sits in the wrong basin), as in
    tests/test_sampling.py's ALD test. More steps per level let the chains cross later and shrink it (n = 20 000,
    seed 5: 0.219 at T = 100, 0.202 at T = 400). Tolerance: 4 binomial s.e. (0.025) + 0.02 for that excess.
    Component means within 4 s.e. sqrt(2 / n_k); per-coordinate variances within 4 s.e. 2.03 sqrt(2 / n_k) of
    LAST_LEVEL_VAR (measured 2.06, 2.03 and 2.03, 2.02; 1.99, 1.98 and 2.02, 1.99 at n = 20 000).
    """
    x, nfe = sampling.ald_sample(jax.random.PRNGKey(0), ANNEALED, TOY.score_fn(ANNEALED), (N_SAMPLES, 2),
                                 step_lr=EPS, n_steps_each=100, denoise=False, init="prior")
    x = np.asarray(x, np.float64)
    small = _small_mode(x)
    se = np.sqrt(0.2 * 0.8 / N_SAMPLES)
    print(f"annealed Langevin: small-mode fraction {small.mean():.4f} ± {se:.4f} (target 0.2)")
    assert nfe == 10 * 100
    assert abs(small.mean() - 0.2) < K_SE * se + 0.02
    for part, mean in ((x[small], -5.0), (x[~small], 5.0)):
        n_k = len(part)
        np.testing.assert_allclose(part.mean(axis=0), mean, atol=K_SE * np.sqrt(2.0 / n_k))
        np.testing.assert_allclose(part.var(axis=0), LAST_LEVEL_VAR, atol=K_SE * LAST_LEVEL_VAR * np.sqrt(2.0 / n_k))


def test_annealed_langevin_inpainting_follows_the_known_coordinate():
    """sampling.ald_inpaint with x = -5 known: the conditional p(y | x = -5) puts all but e^-25 of its mass in the
    small mode (unconditionally 1/5), y ~ N(-5, 2) at the last level; the known coordinate is returned exactly.

    Measured (seed 0): 0.9992 in the small mode (seeds 1, 2: 0.998, 0.9995: a few chains commit to the large mode at
    a level whose noisy copy of x is far from -5, and slide back along y slowly); y < 0: mean -5.01, variance 2.16
    (seeds 1, 2: 2.18, 1.96; n = 20 000: 2.01, its quantiles those of N(-5, 2.025) to ±0.05 but for the 0.1 % of
    sliding chains beyond y = -0.5). Tolerances: > 0.99 in the small mode; the mean within 4 s.e. sqrt(2 / n); the
    variance within 4 s.e. 2.03 sqrt(2 / n) of LAST_LEVEL_VAR + 0.03 for the sliding chains (0.1 % at y ≈ 0 add
    0.001 × 5² = 0.025).
    """
    data = jnp.tile(jnp.array([[-5.0, 123.0]]), (N_SAMPLES, 1))  # the unknown entry's value must not matter
    x, nfe = sampling.ald_inpaint(jax.random.PRNGKey(0), ANNEALED, TOY.score_fn(ANNEALED), data,
                                  np.array([True, False]), step_lr=EPS, n_steps_each=100, denoise=False)
    x = np.asarray(x, np.float64)
    y = x[x[:, 1] < 0.0, 1]
    print(f"ALD inpainting: small-mode fraction {len(y) / N_SAMPLES:.4f}, y mean {y.mean():.3f} var {y.var():.3f}")
    assert nfe == 10 * 100
    np.testing.assert_array_equal(x[:, 0], -5.0)
    assert len(y) / N_SAMPLES > 0.99
    np.testing.assert_allclose(y.mean(), -5.0, atol=K_SE * np.sqrt(2.0 / len(y)))
    np.testing.assert_allclose(y.var(), LAST_LEVEL_VAR, atol=K_SE * LAST_LEVEL_VAR * np.sqrt(2.0 / len(y)) + 0.03)


def test_get_inpainting_fn_reads_the_config():
    """config.sampling.method "ald" inpaints by ald_inpaint with step_lr, n_steps_each, noise_removal and ald_init;
    any other method by the PC `inpaint` with the predictor, corrector, snr, n_steps_each, noise_removal and eps:
    the same draws as the direct calls."""
    config = default_toy_configs.get_default_configs()
    data, mask, score = jnp.tile(jnp.array([[-5.0, 0.0]]), (8, 1)), np.array([True, False]), TOY.score_fn(ANNEALED)
    rng = jax.random.PRNGKey(3)
    config.sampling.update(method="ald", n_steps_each=3, noise_removal=True)
    config.sampling.step_lr, config.sampling.ald_init = 0.05, "uniform"
    x, nfe = sampling.get_inpainting_fn(config, ANNEALED)(rng, score, data, mask)
    want, want_nfe = sampling.ald_inpaint(rng, ANNEALED, score, data, mask, step_lr=0.05, n_steps_each=3,
                                          denoise=True, init="uniform")
    np.testing.assert_array_equal(x, want)
    assert nfe == want_nfe == 10 * 3 + 1
    config.sampling.update(method="pc", predictor="reverse_diffusion", corrector="langevin", snr=0.2, eps=1e-3)
    x, nfe = sampling.get_inpainting_fn(config, ANNEALED)(rng, score, data, mask)
    want, want_nfe = sampling.inpaint(rng, ANNEALED, score, data, mask, predictor="reverse_diffusion",
                                      corrector="langevin", snr=0.2, n_steps=3, denoise=True, eps=1e-3)
    np.testing.assert_array_equal(x, want)
    assert nfe == want_nfe == 10 * (1 + 3)
