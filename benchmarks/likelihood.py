"""Probability-flow ODE likelihood: one compiled diffrax solve vs the score-SDE code's host-driven scipy loop.

    python benchmarks/likelihood.py [--batch 64] [--dims 2,64] [--sde vpsde] [--solver dopri5] [--exact]

For each data dimension D: the default toy MLP score network (configs/default_toy_configs.py, data.dim = D) with
random weights (its output layer starts at zero, so the zero-initialized parameters get small random values),
B points of 8-bit data uniformly dequantized into [-1, 1]^D, and the same Hutchinson probe for both solvers.
`likelihood.log_likelihood` (default Dopri5, the tableau of scipy's RK45, so the two differ only in how the loop
is driven; the whole batch on device, timed after a warm-up compile) is timed against scipy
`solve_ivp(method="RK45")` calling a jitted ODE function with the state flattened to numpy on every call
(as score_sde's likelihood.py does), at the same rtol/atol. One line per case: both wall times, both NFEs, the
speed ratio and the largest difference in bits/dim. About 30 s on 2 CPU cores with the defaults.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import likelihood  # noqa: E402
import models  # noqa: E402
import sde_lib  # noqa: E402
from configs import default_toy_configs  # noqa: E402

_SDES = {"vpsde": sde_lib.VPSDE, "subvpsde": sde_lib.subVPSDE, "vesde": sde_lib.VESDE}


def random_score_fn(rng, sde, dim, batch, scale=0.05):
    """The default toy MLP on `dim` dimensions, its zero-initialized parameters (the output layer, the biases) set
    to N(0, scale²): a random smooth network of moderate output, as a score function."""
    config = default_toy_configs.get_default_configs()
    config.data.dim = dim
    model = models.create_model(config)
    init_rng, jitter_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((batch, dim)), jnp.zeros((batch,)), train=False)
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jitter_rng, len(leaves))
    leaves = [jnp.where(jnp.any(p != 0), p, scale * jax.random.normal(k, p.shape, p.dtype))
              for p, k in zip(leaves, keys)]
    return models.get_score_fn(sde, model, jax.tree_util.tree_unflatten(treedef, leaves), continuous=True)


def scipy_log_likelihood(sde, score_fn, x, probe, exact, rtol, atol, eps):
    """The score-SDE code's way: RK45 on the host, the joint state (x, ∫div) flattened to float64 numpy."""
    drift_fn = lambda y, t: sde.reverse(score_fn, probability_flow=True).sde(y, t)[0]

    @jax.jit
    def ode_fn(state, t):
        y = state[:x.size].reshape(x.shape).astype(jnp.float32)
        fn = lambda z: drift_fn(z, jnp.full(x.shape[:1], t, jnp.float32))
        drift, div = (likelihood.divergence_exact(fn, y) if exact
                      else likelihood.divergence_hutchinson(fn, y, probe))
        return jnp.concatenate([drift.reshape(-1), div])

    fun = lambda t, state: np.asarray(ode_fn(state, t), np.float64)
    y0 = np.concatenate([np.asarray(x, np.float64).reshape(-1), np.zeros(x.shape[0])])
    fun(eps, y0)  # compile outside the timed region
    start = time.perf_counter()
    solution = integrate.solve_ivp(fun, (eps, sde.T), y0, rtol=rtol, atol=atol, method="RK45")
    seconds = time.perf_counter() - start
    z = solution.y[:x.size, -1].reshape(x.shape)
    logp = np.asarray(sde.prior_logp(jnp.asarray(z, jnp.float32))) + solution.y[x.size:, -1]
    return logp, solution.nfev, seconds


def diffrax_log_likelihood(rng, sde, score_fn, x, exact, rtol, atol, eps, solver, repeats):
    """`likelihood.log_likelihood` after one warm-up (compiling) call; the best of `repeats` timed calls."""
    options = dict(exact_divergence=exact, rtol=rtol, atol=atol, eps=eps, solver=solver)
    jax.block_until_ready(likelihood.log_likelihood(rng, sde, score_fn, x, **options))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        logp, _, nfe = jax.block_until_ready(likelihood.log_likelihood(rng, sde, score_fn, x, **options))
        times.append(time.perf_counter() - start)
    return np.asarray(logp), int(nfe), min(times)


def run_case(args, dim):
    sde = _SDES[args.sde]()
    model_rng, data_rng, dequant_rng, probe_rng = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    score_fn = random_score_fn(model_rng, sde, dim, args.batch)
    k = jax.random.randint(data_rng, (args.batch, dim), 0, 256)
    x = likelihood.uniform_dequantize(dequant_rng, k, (-1.0, 1.0), 256)
    # log_likelihood draws its Rademacher probe from probe_rng exactly like this, so both solve the same ODE.
    probe = jax.random.rademacher(probe_rng, x.shape, jnp.float32)
    lp_dx, nfe_dx, t_dx = diffrax_log_likelihood(probe_rng, sde, score_fn, x, args.exact, args.rtol, args.atol,
                                                 args.eps, args.solver, args.repeats)
    lp_sp, nfe_sp, t_sp = scipy_log_likelihood(sde, score_fn, x, probe, args.exact, args.rtol, args.atol, args.eps)
    bpd_dx, bpd_sp = (np.asarray(likelihood.bits_per_dim(lp, (dim,), (-1.0, 1.0), 256)) for lp in (lp_dx, lp_sp))
    divergence = "exact" if args.exact else "hutchinson"
    print(f"likelihood {args.sde} D={dim} B={args.batch} {divergence} rtol={args.rtol:g} atol={args.atol:g}: "
          f"diffrax {args.solver} {t_dx:.3f} s nfe {nfe_dx} | scipy RK45 host loop {t_sp:.3f} s nfe {nfe_sp} | "
          f"speedup {t_sp / t_dx:.1f}x | bpd {bpd_dx.mean():.4f} max|Δbpd| {np.abs(bpd_dx - bpd_sp).max():.1e}",
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dims", default="2,64", help="comma-separated data dimensions, one case each")
    parser.add_argument("--sde", default="vpsde", choices=sorted(_SDES))
    parser.add_argument("--solver", default="dopri5", help="likelihood.py's solver name (tsit5, dopri5, ...)")
    parser.add_argument("--exact", action="store_true", help="exact divergence (D jvps) instead of Hutchinson")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for dim in (int(d) for d in args.dims.split(",")):
        run_case(args, dim)


if __name__ == "__main__":
    main()
