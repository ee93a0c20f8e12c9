"""Sample quality against score evaluations (NFE) on Gaussian-mixture oracles with the exact score (SPEC §2, §7, §9).

    python benchmarks/samplers.py [--n 10000] [--sde vpsde] [--cases 2d,16d] [--seed 0]
    python benchmarks/samplers.py --cases demo [--demo_workdir runs/demo] [--demo_n 256] [--demo_pc1000]
    [--only edm,em-35]   # only the samplers whose label contains one of the words

Cases: "2d", the eight-Gaussians mixture of datasets.py (8 modes, std 0.35, radius 2.83); "16d", a fixed random
16-D mixture of 6 components with full covariances. The score is the exact ∇ log p_t of the mixture (SPEC §9), so
every difference between the lines below is the sampler's. Each sampler draws n samples from eps = 1e-3 (VP,
sub-VP) or 1e-5 (VE):
  pc        reverse diffusion + one Langevin corrector (snr 0.16), 1000 steps: the baseline (NFE 2000);
  em-N      Euler-Maruyama on the reverse SDE with N steps (an SDE with N levels);
  ode-S-G-N the probability-flow ODE with fixed-step solver S (euler | heun | midpoint) on N steps of the time grid
            G (uniform in t, or EDM's ρ = 7 schedule of the noise-to-signal ratio);
  ode-S-tol adaptive Tsit5 / Dopri5 at rtol = atol = tol;
  edm-17    Karras et al. (2022)'s stochastic sampler (sampling.edm_sample): 17 Heun steps on EDM's grid with noise
            added before each ("churn"), + its denoising step: 35 NFE.
SDE samplers return their last step's noise-free mean (noise_removal); ODE samplers their state at eps (no extra
denoising evaluation), so NFE is exactly the solve's.

Quality, one line per sampler:
  nll_gap = E_samples[-log p_0(x)] - H(p_0), in nats, with its standard error; H is estimated from 200 000 true
            samples (its own s.e. < 0.003 nats). 0 for exact samples; > 0 when mass leaks between or around modes,
            < 0 when the sampler concentrates on the modes (too narrow).
  sw2     = sliced Wasserstein-2 distance to n independent true samples over 256 fixed random directions; the
            "true" line gives its noise floor (the same statistic between two independent sets of true samples).

Target: PC (1000 steps, 2000 NFE) quality at ≤ 35 NFE. "Met" by a sampler with NFE ≤ 35 whose nll_gap is within
2 standard errors of the difference from PC's and whose sw2 is at most PC's + 2 s.d. of the true-vs-true floor (the
spread of sw2 over 4 independent pairs of true sets). The last lines name the samplers at ≤ 35 NFE that meet it.

Case "demo": the trained demo model (`make demo`: configs/demo/mnist_ddpmpp.py, --demo_workdir) with the MNIST5K
digit classifier (--classifier), quality = Fréchet / kernel classifier distance and classifier score of
--demo_n samples against the 500 test digits (evaluation.sample_quality_evaluator, as --mode=eval reports them);
the "data" line scores --demo_n training digits instead of samples (the floor of these statistics at this n).
The baseline is the demo's own sampler (reverse diffusion, 200 steps, no corrector); --demo_pc1000 adds PC with
1000 steps and a Langevin corrector (2000 NFE: about 15 minutes on 2 cores for 256 samples).

Result (2 CPU cores, VP SDE, n = 10 000, seed 0, 82 s): the target is met on both oracles, by the midpoint
method on 17 uniform steps (34 NFE) on both, and on "2d" also by Euler on 35 uniform steps and Heun / midpoint
on 17 EDM steps; EDM's stochastic sampler is the worst at 35 NFE there (its churn's discretization error). On the
4,000-step demo model it is the only one that meets it: FCD 8.0 ± 0.8 over 3 draws (edm-17) against 7.6 ± 0.8 for
reverse diffusion on 200 steps and 10.1 for PC-1000, while the probability-flow ODE ends in noise for ~40 % of the
prior draws with every solver (FCD ~650) and the SDE samplers at 35 NFE reach FCD 21 (Euler-Maruyama) and 31
(reverse diffusion). Tables in the README.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import evaluation  # noqa: E402
import sampling  # noqa: E402
import sde_lib  # noqa: E402

_SDES = {"vpsde": lambda n: sde_lib.VPSDE(N=n), "subvpsde": lambda n: sde_lib.subVPSDE(N=n),
         "vesde": lambda n: sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=n)}
_EPS = {"vpsde": 1e-3, "subvpsde": 1e-3, "vesde": 1e-5}


def random_mixture(seed, dim=16, k=6):
    """k components, means N(0, 2² I), covariances A Aᵀ/dim + 0.1 I with A standard normal (fixed by seed)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, dim, dim))
    covs = np.einsum("kij,klj->kil", a, a) / dim * 0.3 + 0.1 * np.eye(dim)
    weights = rng.dirichlet(np.full(k, 5.0))
    return datasets.GaussianMixture(weights, 2.0 * rng.normal(size=(k, dim)), covs)


_CASES = {"2d": lambda seed: datasets.EIGHT_GAUSSIANS, "16d": random_mixture}


class EigenMixture:
    """The exact log p_t and score of a GaussianMixture through each component's eigendecomposition Σ_k = U Λ Uᵀ.

    p_t's components have covariance m² Σ_k + σ² I = U (m² Λ + σ² I) Uᵀ (SPEC §9), so one rotation per point and
    component replaces the per-point Cholesky factorization of datasets.GaussianMixture: the same numbers (checked
    in `check_against`), fast enough for 2000-step samplers on 10 000 points of 16 dimensions.
    """

    def __init__(self, mixture):
        lam, u = np.linalg.eigh(mixture.covs)
        self.mixture = mixture
        self.log_weights = jnp.asarray(np.log(mixture.weights), jnp.float32)
        self.means, self.lam, self.u = (jnp.asarray(a, jnp.float32) for a in (mixture.means, lam, u))

    def _terms(self, x, m, var):
        """log π_k + log N(x; m μ_k, C_k) [B, K] and C_k⁻¹ (x - m μ_k) [B, K, D] for per-point m, var [B]."""
        y = jnp.einsum("bkd,kde->bke", x[:, None, :] - m[:, None, None] * self.means[None], self.u)
        d = m[:, None, None] ** 2 * self.lam[None] + var[:, None, None]
        log_comp = -0.5 * jnp.sum(y**2 / d + jnp.log(2 * np.pi * d), axis=-1)
        return self.log_weights + log_comp, jnp.einsum("bke,kde->bkd", y / d, self.u)

    def log_prob(self, x):
        """log p_0(x) [B]."""
        ones = jnp.ones(x.shape[:1])
        return jax.scipy.special.logsumexp(self._terms(x, ones, 0.0 * ones)[0], axis=1)

    def score_fn(self, sde):
        def score(x, t):
            log_joint, prec_diff = self._terms(x, sde.mean_coef(t), sde.marginal_std(t) ** 2)
            return -jnp.einsum("bk,bkd->bd", jax.nn.softmax(log_joint, axis=1), prec_diff)

        return score

    def check_against(self, sde, rng):
        """Largest relative difference from datasets.GaussianMixture's score and log p_0 on 64 points at 4 times."""
        x = self.mixture.sample(rng, 64) * 1.5
        worst = float(jnp.max(jnp.abs(self.log_prob(x) - self.mixture.log_prob(x))
                              / jnp.abs(self.mixture.log_prob(x))))
        for t in (1e-3, 0.1, 0.5, 1.0):
            tt = jnp.full((64,), t, jnp.float32)
            want = self.mixture.score(x, tt, sde)
            got = self.score_fn(sde)(x, tt)
            worst = max(worst, float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))))
        return worst


def samplers(sde_name):
    """(label, sde steps N, sampling.sample kwargs) of every sampler in the table."""
    table = [("pc", 1000, dict(method="pc", predictor="reverse_diffusion", corrector="langevin", snr=0.16))]
    table += [(f"em-{n}", n, dict(method="euler")) for n in (1000, 100, 35)]
    fixed = {"euler": (18, 35, 100), "heun": (9, 17, 50), "midpoint": (9, 17, 50)}
    for solver, steps in fixed.items():
        for schedule in ("uniform", "edm"):
            table += [(f"ode-{solver}-{schedule}-{n}", 1000,
                       dict(method="ode", solver=solver, schedule=schedule, n_steps=n, denoise=False))
                      for n in steps]
    for solver in ("tsit5", "dopri5"):
        table += [(f"ode-{solver}-{tol:g}", 1000, dict(method="ode", solver=solver, rtol=tol, atol=tol,
                                                       denoise=False)) for tol in (1e-2, 1e-3, 1e-5)]
    return table + edm_samplers()


def edm_samplers():
    """EDM's stochastic sampler at 35 NFE (17 Heun steps + the denoising step): its ImageNet-64 churn (S_churn 40
    on σ̃ in [0.05, 50], S_noise 1.003), the same churn on σ̃ ≤ 10 only, and churn on every step."""
    return [("edm-17", 1000, dict(method="edm", n_steps=17)),
            ("edm-17-tmax10", 1000, dict(method="edm", n_steps=17, churn_range=(0.05, 10.0))),
            ("edm-17-churn-all", 1000, dict(method="edm", n_steps=17, churn=1e9, churn_range=(0.0, 1e9),
                                             noise_scale=1.0))]


def quality_line(case, label, nfe, x, oracle, entropy, reference, directions):
    nll = -np.asarray(oracle.log_prob(jnp.asarray(x)), np.float64)
    gap, se = nll.mean() - entropy, nll.std() / np.sqrt(len(nll))
    sw2 = evaluation.sliced_w2(np.asarray(x, np.float64), reference, directions)
    print(f"samplers {case:4s} {label:24s} nfe {nfe:5d} | nll_gap {gap:+.4f} ± {se:.4f} nats | sw2 {sw2:.4f}",
          flush=True)
    return gap, se, sw2


def run_case(case, args):
    mixture = _CASES[case](args.seed)
    oracle = EigenMixture(mixture)
    rngs = jax.random.split(jax.random.PRNGKey(args.seed), 8)
    probe_sde = _SDES[args.sde](1000)
    worst = oracle.check_against(probe_sde, rngs[0])
    if worst > 1e-4:
        raise RuntimeError(f"the eigendecomposition oracle differs from GaussianMixture by {worst:.1e}")
    entropy = -float(np.mean(np.asarray(oracle.log_prob(mixture.sample(rngs[1], 200_000)), np.float64)))
    directions = evaluation.unit_directions(mixture.dim, 256, args.seed)
    reference = np.asarray(mixture.sample(rngs[2], args.n), np.float64)
    floors = [evaluation.sliced_w2(np.asarray(mixture.sample(k, args.n), np.float64),
                        np.asarray(mixture.sample(jax.random.fold_in(k, 1), args.n), np.float64), directions)
              for k in jax.random.split(rngs[3], 4)]
    print(f"samplers {case} D={mixture.dim} K={len(mixture.weights)} {args.sde} n={args.n} entropy {entropy:.4f} "
          f"nats; sw2 floor {np.mean(floors):.4f} ± {np.std(floors):.4f} (true vs true, 4 pairs)", flush=True)
    results = {"true": quality_line(case, "true", 0, mixture.sample(rngs[4], args.n), oracle, entropy, reference,
                                    directions) + (0,)}
    sdes = {}  # one SDE and score per step count, so that samplers of the same structure share their compilation
    for label, n, kwargs in selected(samplers(args.sde), args.only and args.only + ",pc"):
        sde, score_fn = sdes.setdefault(n, (lambda sde: (sde, oracle.score_fn(sde)))(_SDES[args.sde](n)))
        x, nfe = sampling.sample(rngs[5], sde, score_fn, (args.n, mixture.dim), eps=_EPS[args.sde], **kwargs)
        results[label] = quality_line(case, label, nfe, x, oracle, entropy, reference, directions) + (nfe,)
    report_target(case, results, np.std(floors))


def selected(table, only):
    """The rows whose label contains one of the comma-separated words of `only` (all rows when it is empty)."""
    words = [w for w in only.split(",") if w]
    return [row for row in table if not words or any(w in row[0] for w in words)]


def report_target(case, results, floor_sd):
    pc_gap, pc_se, pc_sw2, _ = results["pc"]
    met = [label for label, (gap, se, sw2, nfe) in results.items()
           if 0 < nfe <= 35 and abs(gap) <= abs(pc_gap) + 2 * np.hypot(se, pc_se) and sw2 <= pc_sw2 + 2 * floor_sd]
    print(f"samplers {case} target (PC quality at <= 35 NFE): {'MET by ' + ', '.join(met) if met else 'NOT met'}",
          flush=True)


# --- The demo model (images): classifier distances of its samples. ---

def demo_samplers(args):
    """(label, sde steps N, sampling.sample kwargs) on the demo model; every sampler ends with the noise-free
    denoising step, as the demo config's sampling.noise_removal asks (one more NFE for the ODE samplers)."""
    table = [("demo-pc-200", 200, dict(method="pc", predictor="reverse_diffusion", corrector="none"))]
    if args.demo_pc1000:
        table.append(("pc-1000", 1000, dict(method="pc", predictor="reverse_diffusion", corrector="langevin",
                                            snr=0.16)))
    table += [("em-100", 100, dict(method="euler")), ("em-35", 35, dict(method="euler")),
              ("rd-35", 35, dict(method="pc", predictor="reverse_diffusion", corrector="none"))]
    table += [(f"ode-{solver}-{schedule}-{n}", 1000, dict(method="ode", solver=solver, schedule=schedule,
                                                           n_steps=n, denoise=True))
              for solver, schedule, n in (("heun", "edm", 9), ("heun", "edm", 17), ("heun", "edm", 30),
                                          ("midpoint", "uniform", 17), ("midpoint", "edm", 17),
                                          ("euler", "edm", 35))]
    table += [(f"ode-tsit5-{tol:g}", 1000, dict(method="ode", solver="tsit5", rtol=tol, atol=tol, denoise=True))
              for tol in (1e-2, 1e-3)]
    return table + edm_samplers()


def run_demo(args):
    import run_lib  # noqa: E402
    from configs.demo import mnist_ddpmpp  # noqa: E402

    config = mnist_ddpmpp.get_config()
    config.eval.classifier_weights = args.classifier
    setup = run_lib.Setup(config)
    state, step = run_lib.restore_latest(args.demo_workdir, config, setup)
    score_fn = setup.score_fn(state.ema_params)
    dataset = setup.dataset
    score = evaluation.sample_quality_evaluator(config, dataset.data_range, dataset.levels)
    reference = [dataset.reference_data()]
    rng = jax.random.PRNGKey(args.seed)

    def line(label, nfe, x, seconds):
        m = dict(score(jax.random.fold_in(rng, 1), [np.asarray(x)], reference))
        print(f"samplers demo {label:24s} nfe {nfe:5d} | fcd {m['fcd']:7.3f} | kcd {m['kcd']:+.4f} ± "
              f"{m['kcd_se']:.4f} | classifier score {m['classifier_score']:.2f} | {seconds:6.1f} s", flush=True)

    train = dataset.to_float(dataset.train_levels, 0.5)
    print(f"samplers demo: checkpoint step {step} of {args.demo_workdir}, n = {args.demo_n}", flush=True)
    line("data (training digits)", 0, train[np.random.default_rng(args.seed).choice(len(train), args.demo_n,
                                                                                   replace=False)], 0.0)
    shape = (args.demo_n,) + dataset.shape
    for label, n, kwargs in selected(demo_samplers(args), args.only):
        sde = sde_lib.VPSDE(beta_min=config.model.beta_min, beta_max=config.model.beta_max, N=n)
        start = time.perf_counter()
        x, nfe = sampling.sample(jax.random.fold_in(rng, 2), sde, score_fn, shape, eps=config.sampling.eps, **kwargs)
        x = jax.block_until_ready(x)
        line(label, int(nfe), x, time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="samples per sampler")
    parser.add_argument("--sde", default="vpsde", choices=sorted(_SDES))
    parser.add_argument("--cases", default="2d,16d", help=f"comma-separated, of {sorted(_CASES) + ['demo']}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo_workdir", default="runs/demo", help="case demo: the trained demo's workdir")
    parser.add_argument("--classifier", default="runs/classifiers/mnist5k.msgpack", help="case demo: weights")
    parser.add_argument("--demo_n", type=int, default=256, help="case demo: samples per sampler")
    parser.add_argument("--demo_pc1000", action="store_true", help="case demo: add PC with 1000 steps")
    parser.add_argument("--only", default="", help="comma-separated words: only the samplers whose label has one "
                        "(the mixtures' baseline pc always runs), e.g. --only=edm,em-35")
    args = parser.parse_args()
    start = time.perf_counter()
    for case in args.cases.split(","):
        run_demo(args) if case == "demo" else run_case(case, args)
    print(f"samplers total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
