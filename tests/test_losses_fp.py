"""Tests of the score Fokker-Planck regularizer in losses.py (SPEC §5, seed 002) against a closed form.

For p_0 = N(0, c² I) the exact score is -x/V(t), V = m² c² + σ_t², and V' = 2 a V + g² for all three SDEs. The
one-parameter field s_θ = -θ x / V has ∂_t s_θ = θ x V'/V², ∇·s_θ = -θ D/V, ||s_θ||² = θ² ||x||²/V² and
⟨f, s_θ⟩ = -a θ ||x||²/V, so its residual is r = θ x V'/V² - (g² θ² x/V² + 2 a θ x/V) = θ (1 - θ) g² x / V².
Hence the penalty w(t) ||r||²/D = w(t) θ² (1 - θ)² g⁴ ||x||² / (D V⁴), zero at θ = 1 (the true score) and at
θ = 0, and its θ-derivative is w g⁴ ||x||²/(D V⁴) · 2 θ (1 - θ)(1 - 2 θ): the third derivative autodiff takes
through jvp-in-t, the divergence and the outer ∇_x.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses
import models
import sde_lib
from configs.default_toy_configs import get_default_configs

SDES = {
    "vesde": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0),
    "vpsde": lambda: sde_lib.VPSDE(beta_min=0.1, beta_max=20.0),
    "subvpsde": lambda: sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0),
}
C = 0.7
D = 3
TIMES = jnp.tile(jnp.array([0.05, 0.2, 0.5, 0.9]), 2)


def _variance(sde, t):
    return sde.mean_coef(t) ** 2 * C**2 + sde.marginal_std(t) ** 2


def _theta_score(sde, theta):
    return lambda x, t: -theta * x / _variance(sde, t)[:, None]


def _points(sde, t):
    x0 = C * jax.random.normal(jax.random.PRNGKey(0), (t.shape[0], D))
    mean, std = sde.marginal_prob(x0, t)
    return mean + std[:, None] * jax.random.normal(jax.random.PRNGKey(1), x0.shape)


def _closed_form_factor(sde, x, t, time_weighting):
    """w(t) g⁴ ||x||² / (D V⁴): the penalty is this times θ² (1 - θ)²."""
    w = sde.diffusion_sq(t) if time_weighting == "g2" else jnp.ones_like(t)
    return w * sde.diffusion_sq(t) ** 2 * jnp.sum(x**2, axis=1) / (D * _variance(sde, t) ** 4)


@functools.partial(jax.jit, static_argnums=(1, 4))
def _penalty_and_grad(theta, sde, x, t, settings):
    penalty = lambda th: losses.fp_penalty(jax.random.PRNGKey(2), sde, _theta_score(sde, th), x, t, settings)
    return penalty(theta), jax.grad(lambda th: jnp.sum(penalty(th)))(theta)


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("time_weighting,probe", [("one", "exact"), ("g2", "rademacher"), ("one", "gaussian")])
def test_penalty_and_its_parameter_gradient_match_the_closed_form(sde_name, time_weighting, probe):
    # J = -θ I / V is constant in x, so one Hutchinson probe of either kind gives the exact residual.
    sde = SDES[sde_name]()
    settings = losses.FPSettings(weight=1.0, time_weighting=time_weighting, probe=probe)
    x, theta = _points(sde, TIMES), 0.6
    penalty, grad = _penalty_and_grad(jnp.float32(theta), sde, x, TIMES, settings)
    factor = np.asarray(_closed_form_factor(sde, x, TIMES, time_weighting), np.float64)
    # float32 rounding of terms that cancel to θ(1-θ) of their size: measured ≤ 3e-5 relative.
    np.testing.assert_allclose(np.asarray(penalty), factor * theta**2 * (1 - theta) ** 2, rtol=1e-3)
    np.testing.assert_allclose(float(grad), np.sum(factor) * 2 * theta * (1 - theta) * (1 - 2 * theta), rtol=1e-3)


def test_penalty_vanishes_for_the_true_score_and_outside_the_time_range():
    sde = SDES["vpsde"]()
    x = _points(sde, TIMES)
    full = losses.FPSettings(weight=1.0, probe="exact")
    exact_score, _ = _penalty_and_grad(jnp.float32(1.0), sde, x, TIMES, full)
    wrong, _ = _penalty_and_grad(jnp.float32(0.6), sde, x, TIMES, full)
    assert float(jnp.max(exact_score)) < 1e-6 * float(jnp.min(wrong))
    ranged, _ = _penalty_and_grad(jnp.float32(0.6), sde, x, TIMES, losses.FPSettings(weight=1.0, probe="exact",
                                                                                     t_min=0.1, t_max=0.6))
    inside = (TIMES >= 0.1) & (TIMES <= 0.6)
    np.testing.assert_array_equal(np.asarray(ranged)[~np.asarray(inside)], 0.0)
    np.testing.assert_allclose(np.asarray(ranged)[np.asarray(inside)], np.asarray(wrong)[np.asarray(inside)])


def _mlp_setup(**fp):
    config = get_default_configs()
    config.model.nf, config.model.num_layers = 16, 1
    config.training.fp.update(fp)
    sde, model = sde_lib.get_sde(config), models.create_model(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((8, 2)), jnp.zeros((8,)), train=False)["params"]
    # The output layer starts at zero (s = 0 has zero residual): move every parameter to a random point.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten([p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return config, sde, model, params


def test_objective_adds_alpha_times_the_penalty_at_the_dsm_points():
    x = jax.random.normal(jax.random.PRNGKey(5), (8, 2))
    rng = jax.random.PRNGKey(6)
    config, sde, model, params = _mlp_setup(weight=0.0)
    plain, plain_aux = losses.get_loss_fn(config, sde, model, train=False)(params, x, rng)
    config, sde, model, params = _mlp_setup(weight=0.5, probe="exact")
    loss, aux = losses.get_loss_fn(config, sde, model, train=False)(params, x, rng)
    # Off: the loss is exactly the DSM loss with the same key (the random stream of unregularized runs is kept).
    score_fn = models.get_score_fn(sde, model, {"params": params}, train=False)
    dsm = losses.dsm_loss(jax.random.split(rng)[1], sde, score_fn, x, eps=config.training.eps)
    assert plain_aux == {} and float(plain) == pytest.approx(float(jnp.mean(dsm)), rel=1e-6)
    # On: the DSM term is unchanged and the total adds α times a positive penalty.
    assert float(aux["dsm"]) == pytest.approx(float(plain), rel=1e-6)
    assert float(aux["fp_penalty"]) > 0
    assert float(loss) == pytest.approx(float(plain) + 0.5 * float(aux["fp_penalty"]), rel=1e-6)
    grads = jax.grad(lambda p: losses.get_loss_fn(config, sde, model, train=False)(p, x, rng)[0])(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("fp,continuous,match", [
    (dict(weight=0.1, probe="sobol"), True, "probe"),
    (dict(weight=0.1, time_weighting="sigma"), True, "time_weighting"),
    (dict(weight=-1.0), True, "weight"),
    (dict(weight=0.1, t_min=0.8, t_max=0.2), True, "t_min"),
    (dict(weight=0.1, alpha=0.2), True, "unknown fields"),
    (dict(weight=0.1), False, "continuous DSM"),
])
def test_bad_fp_settings_are_rejected(fp, continuous, match):
    config = get_default_configs()
    config.training.continuous = continuous
    config.training.fp.update(fp)
    with pytest.raises(ValueError, match=match):
        losses.get_loss_fn(config, sde_lib.get_sde(config), models.create_model(config))
