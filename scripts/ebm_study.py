"""Seed 003's experiment: every energy-based-model objective of losses.py on 2-D toy densities (SPEC §6).

    python scripts/ebm_study.py [--datasets=eight_gaussians,checkerboard] [--seeds=0,1,2] [--n_iters=2000]
                                [--objectives=cd,pcd,sm,ssm,ssm_vr,dsm,nce] [--workdir=runs/ebm_study]

Every (objective, dataset, seed) trains the same energy_mlp (unconditional, swish, nf 32 = width 64, 2 residual
blocks, model.energy_quadratic 0.1) with Adam (lr 1e-3, global-norm clip 1) on fresh batches of 256 from the toy
sampler for n_iters steps; the seed fixes initialization, data and training noise. The loop is
self-contained (losses.py's pure EBM functions on the network's energy / conservative score, lax.scan over chunks of
steps, one compilation per objective and dataset) because persistent CD carries its ReplayBuffer between steps.

Evaluation (no training data): the model density is normalized numerically, log Z = log Σ_cells exp(-E) h² by the
midpoint rule on a GRID x GRID grid over the box [-BOX, BOX]² (so "p_model" is the density truncated to the box;
"outer mass" is the fraction of it outside [-4.5, 4.5]², which flags mass that leaked away from the data). On 5,000
held-out points: test NLL = -mean log p_model, and KL(p_data || p_model) = mean (log p_data - log p_model) with
the exact p_data (eight_gaussians: its mixture; checkerboard: 1/32 on its squares); for eight_gaussians also the
mode-weight TV ½ Σ_k |m_k - 1/8| of the model's masses m_k in the 45° sectors around the modes. Samples: 5,000 exact samples
of the grid density (a cell by its mass, uniform inside it) give SW2 to the held-out points, and 1,000 MALA chains
(500 steps, ε = 0.1, from uniform on the box) show what a Langevin sampler of the energy produces. Training time is
the wall time of the compiled training steps (compilation excluded, measured separately). Each run's numbers are
cached in its workdir (result.json); results/ebm_2d.md gets mean ± s.d. over seeds and docs/ebm_2d.png the figure.
"""
import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import evaluation  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
from configs.default_toy_configs import get_default_configs  # noqa: E402
from models import energy  # noqa: E402
from scripts.study import write_keeping_notes  # noqa: E402

BOX, GRID, INNER = 6.0, 400, 4.5
N_TEST, N_MALA, MALA_STEPS, MALA_EPS = 5000, 1000, 500, 0.1
BATCH, CHUNK = 256, 250


@dataclasses.dataclass(frozen=True)
class Settings:
    """The objectives' settings (losses.EBMSettings' meaning): Langevin k and ε, PCD buffer, DSM σ, NCE ν."""

    langevin_steps: int = 20
    step_size: float = 0.1
    buffer_size: int = 8192
    reinit_prob: float = 0.05
    sigma: float = 0.1
    nce_ratio: int = 4


def _uniform_box(rng, shape):
    return jax.random.uniform(rng, shape, minval=-BOX, maxval=BOX)


# objective(s, energy_fn, score_fn, x, rng, buffer) -> (per-example loss [B], buffer, aux); energy_fn / score_fn
# take x only (losses.at_time of the network's functions).
def _cd(s, e, sc, x, rng, buf):
    loss, aux = losses.contrastive_divergence_loss(rng, e, x, s.langevin_steps, s.step_size)
    return loss, buf, aux


def _pcd(s, e, sc, x, rng, buf):
    return losses.persistent_cd_loss(rng, e, x, buf, _uniform_box, s.langevin_steps, s.step_size, s.reinit_prob)


OBJECTIVES = {
    "cd": ("CD-k (ULA from data)", _cd),
    "pcd": ("PCD (replay buffer)", _pcd),
    "sm": ("exact SM", lambda s, e, sc, x, rng, buf: (losses.exact_score_matching_loss(sc, x), buf, {})),
    "ssm": ("SSM", lambda s, e, sc, x, rng, buf: (losses.sliced_score_matching_loss(rng, sc, x), buf, {})),
    "ssm_vr": ("SSM-VR", lambda s, e, sc, x, rng, buf: (
        losses.sliced_score_matching_loss(rng, sc, x, variance_reduced=True), buf, {})),
    "dsm": ("DSM", lambda s, e, sc, x, rng, buf: (
        losses.denoising_score_matching_loss(rng, sc, x, s.sigma), buf, {})),
    "nce": ("NCE (fitted Gaussian)", lambda s, e, sc, x, rng, buf: (
        losses.nce_loss(rng, e, x, losses.fit_gaussian_noise(x), s.nce_ratio), buf, {})),
}


def model_config():
    config = get_default_configs()
    config.model.name = "energy_mlp"
    config.model.nf = 32
    config.model.num_layers = 2
    config.model.energy_quadratic = 0.1
    return config


@dataclasses.dataclass(frozen=True)
class _NetworkEnergy:
    model: object

    def __call__(self, params, x, t):
        return self.model.apply({"params": params}, x, t)


def energy_and_score(model, params):
    """(E(x) [B], -∇x E(x) [B, 2]) of the unconditional network as functions of x only (t is ignored)."""
    network = jax.tree_util.Partial(_NetworkEnergy(model), params)
    return losses.at_time(network, 0.0), losses.at_time(energy.score_from_energy(network), 0.0)


def make_train_chunk(model, objective, settings, sample, optimizer):
    """A jitted chunk of CHUNK steps: state (params, opt_state, buffer, step, nonfinite) -> state, mean loss."""

    def loss_fn(params, x, rng, buf):
        e, sc = energy_and_score(model, params)
        loss, buf, aux = objective(settings, e, sc, x, rng, buf)
        return jnp.mean(loss), (buf, aux)

    def step(state, _):
        params, opt_state, buf, i, bad, rng = state
        data_rng, loss_rng = jax.random.split(jax.random.fold_in(rng, i))
        x = sample(data_rng, BATCH)
        (loss, (new_buf, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, loss_rng, buf)
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = (keep(new_params, params), keep(new_opt, opt_state), keep(new_buf, buf), i + 1,
                     bad + (~finite).astype(jnp.int32), rng)
        return new_state, loss

    def chunk(state):
        state, loss = jax.lax.scan(step, state, None, length=CHUNK)
        return state, jnp.mean(loss)

    return jax.jit(chunk)


def init_state(model, objective_name, settings, seed, optimizer):
    key = jax.random.PRNGKey(seed)
    init_rng, buf_rng, train_rng = jax.random.split(key, 3)
    params = model.init(init_rng, jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    size = settings.buffer_size if objective_name == "pcd" else 1
    buf = losses.init_replay_buffer(buf_rng, _uniform_box, size, (2,))
    return (params, optimizer.init(params), buf, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), train_rng)


def grid_points():
    h = 2 * BOX / GRID
    centers = -BOX + h * (np.arange(GRID) + 0.5)
    xx, yy = np.meshgrid(centers, centers, indexing="xy")
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float32), h


def true_log_density(dataset, x):
    """log p_data(x) [n] (exact) for the toys that have it; -inf off the checkerboard's squares."""
    x = np.asarray(x, np.float64)
    if dataset == "checkerboard":
        col, row = np.floor(x[:, 0] / 2), np.floor(x[:, 1] / 2)
        inside = (np.abs(x) <= 4).all(axis=1) & (np.mod(col + row, 2) == 0)
        return np.where(inside, -np.log(32.0), -np.inf)
    toy = datasets.TOY_DATASETS[dataset](None)
    if toy.density is None:
        return None
    return np.asarray(toy.density.log_prob(jnp.asarray(x, jnp.float32)), np.float64)


def mode_weight_tv(points, mass):
    """Eight Gaussians: ½ Σ_k |m_k - 1/8|, m_k the model's mass in the 45° sector around mode k (all weigh 1/8)."""
    sector = np.mod(np.round(np.arctan2(points[:, 1], points[:, 0]) / (np.pi / 4)), 8).astype(int)
    masses = np.bincount(sector, weights=mass, minlength=8) / mass.sum()
    return float(0.5 * np.abs(masses - 1 / 8).sum())


def evaluate(model, params, dataset, test, seed):
    """The metrics of the module docstring, plus the seed-0 arrays for the figure."""
    e, _ = energy_and_score(model, params)
    points, h = grid_points()
    grid_e = np.asarray(jax.jit(e)(jnp.asarray(points)), np.float64)
    log_mass = -grid_e - np.logaddexp.reduce(-grid_e)
    log_z = np.logaddexp.reduce(-grid_e) + 2 * np.log(h)
    inner = (np.abs(points) <= INNER).all(axis=1)
    log_p = -np.asarray(jax.jit(e)(jnp.asarray(test)), np.float64) - log_z
    result = {"test_nll": float(-log_p.mean()), "log_z": float(log_z),
              "outer_mass": float(np.exp(log_mass[~inner]).sum())}
    log_data = true_log_density(dataset, test)
    if log_data is not None:
        result["kl"] = float(np.mean(log_data - log_p))
        result["data_entropy"] = float(-np.mean(log_data))
    rng = np.random.default_rng(seed + 1000)
    cells = rng.choice(len(points), size=N_TEST, p=np.exp(log_mass) / np.exp(log_mass).sum())
    exact = points[cells] + h * (rng.uniform(size=(N_TEST, 2)) - 0.5)
    directions = evaluation.unit_directions(2, 256, seed=0)
    result["sw2_grid"] = evaluation.sliced_w2(exact.astype(np.float64), test.astype(np.float64), directions)
    mala_rng, init_rng = jax.random.split(jax.random.PRNGKey(seed + 2000))
    start = _uniform_box(init_rng, (N_MALA, 2))
    chains, acceptance = jax.jit(lambda r, x: losses.langevin_mcmc(r, e, x, MALA_STEPS, MALA_EPS, mala=True))(
        mala_rng, start)
    chains = np.asarray(chains, np.float64)
    result["mala_acceptance"] = float(np.mean(acceptance))
    result["sw2_mala"] = evaluation.sliced_w2(chains, test[:N_MALA].astype(np.float64), directions)
    if dataset == "eight_gaussians":
        result["mode_tv"] = mode_weight_tv(points, np.exp(log_mass))
    arrays = {"log_density": (-grid_e - log_z).reshape(GRID, GRID).astype(np.float32),
              "mala": chains.astype(np.float32)}
    return result, arrays


def test_data(dataset):
    """The held-out points: the toy sampler at a fixed key outside every training stream."""
    return np.asarray(datasets.TOY_DATASETS[dataset](None).sample(jax.random.PRNGKey(987654), N_TEST), np.float32)


def cached_result(run_dir, dataset):
    """A run's result.json, with mode_tv recomputed from its saved grid density when missing."""
    with open(os.path.join(run_dir, "result.json")) as f:
        result = json.load(f)
    if dataset == "eight_gaussians" and "mode_tv" not in result:
        points, _ = grid_points()
        result["mode_tv"] = mode_weight_tv(points, np.exp(np.load(os.path.join(run_dir, "arrays.npz"))["log_density"]
                                                          .astype(np.float64).ravel()))
    return result


def run_objective(name, dataset, seeds, n_iters, workdir, settings):
    """Trains and evaluates every seed of one (objective, dataset) not cached yet; returns the seeds' results."""
    config = model_config()
    model = models.create_model(config)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    sample = datasets.TOY_DATASETS[dataset](None).sample
    chunk, compiled = None, 0.0
    test = test_data(dataset)
    results = []
    for seed in seeds:
        run_dir = os.path.join(workdir, dataset, name, f"seed{seed}")
        path = os.path.join(run_dir, "result.json")
        if os.path.exists(path):
            results.append(cached_result(run_dir, dataset))
            continue
        state = init_state(model, name, settings, seed, optimizer)
        if chunk is None:
            start = time.perf_counter()
            chunk = make_train_chunk(model, OBJECTIVES[name][1], settings, sample, optimizer).lower(state).compile()
            compiled = time.perf_counter() - start
        start, trace = time.perf_counter(), []
        for _ in range(n_iters // CHUNK):
            state, loss = chunk(state)
            trace.append(float(loss))
        train_seconds = time.perf_counter() - start
        result, arrays = evaluate(model, state[0], dataset, test, seed)
        result.update(train_seconds=train_seconds, compile_seconds=compiled, n_iters=n_iters,
                      nonfinite_steps=int(state[4]), loss_trace=trace)
        os.makedirs(run_dir, exist_ok=True)
        np.savez(os.path.join(run_dir, "arrays.npz"), **arrays)
        with open(path, "w") as f:
            json.dump(result, f)
        print(f"{dataset} {name} seed {seed}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)), flush=True)
        results.append(result)
    return results


# (column, metric key, format): the table's columns.
COLUMNS = [("test NLL", "test_nll", ".3f"), ("KL(p_data‖p_model)", "kl", ".3f"),
           ("SW2 exact samples", "sw2_grid", ".3f"), ("SW2 MALA", "sw2_mala", ".3f"),
           ("MALA accept", "mala_acceptance", ".2f"), ("mode-weight TV", "mode_tv", ".3f"),
           ("outer mass", "outer_mass", ".3f"), ("train s", "train_seconds", ".0f")]


def table(results, seeds):
    lines = ["| dataset | objective | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for (dataset, name), runs in results.items():
        cells = []
        for _, key, fmt in COLUMNS:
            values = np.array([r.get(key, np.nan) for r in runs], np.float64)
            if np.isnan(values).all():
                cells.append("—")
                continue
            sd = values.std(ddof=1) if len(values) > 1 else float("nan")
            cells.append(f"{values.mean():{fmt}} ± {sd:{fmt}}")
        lines.append(f"| {dataset} | {OBJECTIVES[name][0]} | " + " | ".join(cells) + " |")
    lines.append("")
    for dataset in dict.fromkeys(d for d, _ in results):
        runs = next(r for (d, _), r in results.items() if d == dataset)
        if "data_entropy" in runs[0]:
            lines.append(f"- {dataset}: entropy of the true density on the held-out points "
                         f"{runs[0]['data_entropy']:.3f} nats (the test NLL of a perfect model; test NLL = this + KL).")
    lines.append(f"- mean ± sample s.d. over seeds {seeds}; compilation excluded from train s.")
    return "\n".join(lines)


def figure(results_dirs, datasets_, names, path):
    """Per dataset two rows: the seed-0 model density of each objective (first column: the true density / data
    histogram), and its MALA samples (first column: held-out data)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points, _ = grid_points()
    cols = len(names) + 1
    fig, axes = plt.subplots(2 * len(datasets_), cols, figsize=(2.1 * cols, 4.3 * len(datasets_)), squeeze=False)
    for r, dataset in enumerate(datasets_):
        log_true = true_log_density(dataset, points)
        test = test_data(dataset)
        extent = (-BOX, BOX, -BOX, BOX)
        # One colour scale per row, saturating at 1.5x the true density's maximum, so a narrow spurious spike of a
        # model does not blacken the rest of its map.
        vmax = 1.5 * np.exp(log_true).max() if log_true is not None else None
        if log_true is not None:
            axes[2 * r, 0].imshow(np.exp(log_true).reshape(GRID, GRID), origin="lower", extent=extent, cmap="magma",
                                  vmin=0, vmax=vmax)
        else:
            axes[2 * r, 0].hist2d(test[:, 0], test[:, 1], bins=100, range=[[-BOX, BOX]] * 2, cmap="magma")
        axes[2 * r, 0].set_title(f"{dataset}\ntrue density", fontsize=8)
        axes[2 * r + 1, 0].scatter(test[:N_MALA, 0], test[:N_MALA, 1], s=1)
        axes[2 * r + 1, 0].set_title("held-out data", fontsize=8)
        for c, name in enumerate(names, start=1):
            arrays = np.load(os.path.join(results_dirs, dataset, name, "seed0", "arrays.npz"))
            axes[2 * r, c].imshow(np.exp(arrays["log_density"]), origin="lower", extent=extent, cmap="magma",
                                  vmin=0, vmax=vmax)
            axes[2 * r, c].set_title(f"{OBJECTIVES[name][0]}\nmodel density", fontsize=8)
            axes[2 * r + 1, c].scatter(arrays["mala"][:, 0], arrays["mala"][:, 1], s=1)
            axes[2 * r + 1, c].set_title("MALA samples", fontsize=8)
    for ax in axes.ravel():
        ax.set_xlim(-BOX, BOX)
        ax.set_ylim(-BOX, BOX)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(path, body, command, settings, n_iters):
    header = (f"# Energy-based-model objectives on 2-D toys (scripts/ebm_study.py, seed 003)\n\n"
              f"Reproduce: `{command}`\n\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
              f"CPUs (shared with other jobs, so train s is only indicative), jax {jax.__version__}.\n\n"
              f"Settings: energy_mlp (nf 32, 2 residual blocks, swish, energy_quadratic 0.1), Adam lr 1e-3, "
              f"global-norm clip 1, batch {BATCH}, {n_iters} steps; {settings}. Evaluation: grid {GRID}² on "
              f"[-{BOX:g}, {BOX:g}]² (cell {2 * BOX / GRID:g}), {N_TEST} held-out points; MALA {N_MALA} chains, "
              f"{MALA_STEPS} steps, ε = {MALA_EPS} from uniform on the box.\n\n")
    write_keeping_notes(path, header + body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="eight_gaussians,checkerboard")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n_iters", type=int, default=2000)
    parser.add_argument("--workdir", default="runs/ebm_study")
    parser.add_argument("--output", default="results/ebm_2d.md")
    parser.add_argument("--figure", default="docs/ebm_2d.png")
    parser.add_argument("--report_only", action="store_true", help="only rewrite the table and figure from the cache")
    args = parser.parse_args()
    if args.n_iters % CHUNK:
        raise ValueError(f"--n_iters must be a multiple of {CHUNK}, got {args.n_iters}")
    seeds = [int(s) for s in args.seeds.split(",")]
    names, datasets_ = args.objectives.split(","), args.datasets.split(",")
    unknown = set(names) - set(OBJECTIVES)
    if unknown:
        raise ValueError(f"unknown objectives {sorted(unknown)}; choose from {sorted(OBJECTIVES)}")
    settings, results = Settings(), {}
    workdir = os.path.join(args.workdir, f"iters{args.n_iters}")
    for dataset in datasets_:
        for name in names:
            if args.report_only:
                runs = [cached_result(os.path.join(workdir, dataset, name, f"seed{seed}"), dataset) for seed in seeds]
            else:
                runs = run_objective(name, dataset, seeds, args.n_iters, workdir, settings)
            results[(dataset, name)] = runs
    command = "python " + " ".join(a for a in sys.argv if a != "--report_only")
    write_report(args.output, table(results, seeds), command, settings, args.n_iters)
    figure(workdir, datasets_, names, args.figure)


if __name__ == "__main__":
    main()
