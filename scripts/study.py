"""The experiments of seeds 000-002 on 2-D toys and embedded MNIST: DSM weightings, and DSM with the score
Fokker-Planck regularizer.

    python scripts/study.py --study=weighting        # σ² vs likelihood vs likelihood + importance sampling
    python scripts/study.py --study=fp               # DSM vs DSM + FP (likelihood weighting both)
    python scripts/study.py --study=fp_finetune --datasets=MNIST5K --fp_weight=4.88e-7   # both continue the
                                                     # likelihood run --finetune_iters (400) steps, FP-Diffusion's way
    [--datasets=eight_gaussians,checkerboard(,MNIST5K)] [--seeds=0,1,2] [--workdir=runs/studies] [--n_iters=N]
    [--report_only]                                  # write results/<study>.md from the finished runs, train nothing

Every (dataset, arm, seed) trains configs/toy/vp_eight_gaussians.py's setup (VP SDE, MLP, batch 256, 3,000 steps)
with the arm's overrides and config.seed = seed (data, initialization and training noise all follow it), then
evaluates the EMA parameters with --mode=eval's code on 2,000 held-out points: the NLL by the probability-flow ODE
(exact divergence), seed 001's bound (1,000 importance-sampled times per point), the mean squared score-FPE residual
and the conservativity; and draws 2,000 samples (the config's Euler-Maruyama sampler) for the sliced Wasserstein-2
distance to the held-out points. The spread of the likelihood-weighted loss estimator on the trained model, with
t uniform and with t ~ q(t) ∝ g²/σ², tests seed 001's variance claim. MNIST5K (the embedded digits) trains
configs/demo/mnist_ddpmpp.py (the DDPM++ demo, batch 16, 2,000 steps) instead and reports bits/dim (Hutchinson
ODE, rtol 1e-4, and the bound) on its 32 test digits, and in place of SW2 the Fréchet classifier distance of 256
samples (the config's sample-quality evaluation; needs runs/classifiers/mnist5k.msgpack, see
scripts/train_digit_classifier.py); its FP arm takes one Rademacher probe for the divergence. FP-Diffusion's α is
--fp_weight = 2α/D² here (results/fp.md): 4.88e-7 on MNIST for its 0.15. Each run's numbers are saved in its
workdir (result.json), so a rerun only computes what is missing, and the FP study's DSM arm is the weighting
study's likelihood run (the same config); results/<study>.md gets mean ± s.d. over each row's seeds.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import evaluation  # noqa: E402
import losses  # noqa: E402
import run_lib  # noqa: E402
from configs.demo import mnist_ddpmpp  # noqa: E402
from configs.toy import vp_eight_gaussians  # noqa: E402



def studies(fp_weight, fp_t_min, fp_probe="exact"):
    """{study: {arm: config overrides}}. The FP arm: weight α with w(t) = g² (FP-Diffusion's 'll' weighting), the
    divergence by fp_probe (exact for 2-D, one Rademacher probe for images), on [fp_t_min, T]."""
    fp_on = {"training.fp.weight": fp_weight, "training.fp.time_weighting": "g2", "training.fp.probe": fp_probe,
             "training.fp.t_min": fp_t_min}
    fp_arms = {"dsm": {"training.weighting": "likelihood"},
               f"dsm+fp α={fp_weight:g} t≥{fp_t_min:g}": {"training.weighting": "likelihood", **fp_on}}
    return {
        "weighting": {"sigma2": {"training.weighting": "sigma2"},
                      "likelihood": {"training.weighting": "likelihood"},
                      "likelihood_importance": {"training.weighting": "likelihood_importance"}},
        "fp": fp_arms,
        "fp_finetune": fp_arms,
    }

# Exact entropies (nats) of the toy densities: checkerboard is uniform on 8 squares of area 4.
ENTROPY = {"checkerboard": float(np.log(32.0))}
# (column, metric key, format): the tables' columns.
COLUMNS = {
    "weighting": [("ODE NLL", "test_nll", ".3f"), ("bound", "bound_nll", ".3f"), ("SW2", "sw2", ".4f"),
                  ("loss s.d. uniform t", "loss_sd_uniform", ".3f"), ("loss s.d. IS", "loss_sd_importance", ".3f"),
                  ("loss mean uniform t", "loss_mean_uniform", ".3f"), ("loss mean IS", "loss_mean_importance", ".3f"),
                  ("train s", "train_seconds", ".0f")],
    "fp": [("FPE residual", "fpe_residual", ".3g"), ("FPE residual, t > 0.1", "fpe_residual_late", ".3g"),
           ("conservativity", "conservativity", ".3g"),
           ("ODE NLL", "test_nll", ".3f"), ("bound", "bound_nll", ".3f"), ("bound − ODE", "bound_gap", ".3f"),
           ("SW2", "sw2", ".4f"), ("train s", "train_seconds", ".0f")],
}
COLUMNS["fp_finetune"] = COLUMNS["fp"]
_NOTES = "<!-- notes: kept when the script rewrites this file -->"


# Image datasets and their base config; every other dataset name is a 2-D toy on configs/toy/vp_eight_gaussians.py.
IMAGE_BASES = {"MNIST5K": mnist_ddpmpp.get_config}
# Training steps unless --n_iters: 3,000 for a toy; 2,000 for the DDPM++ demo (~3.5 min at 9.5 steps/s on 2 idle cores).
DEFAULT_ITERS = {"toy": 3000, "MNIST5K": 2000}
# Arms that are the same run as another study's arm (identical overrides): their runs are shared, not repeated.
SAME_RUN = {("fp", "dsm"): ("weighting", "likelihood")}
# Fine-tuning studies (FP-Diffusion fine-tunes pre-trained models): every arm continues the named (study, arm)'s run
# of the same seed for --finetune_iters more steps, from its final checkpoint.
FINETUNE_FROM = {"fp_finetune": ("weighting", "likelihood")}
# An image row reports bits/dim and the classifier distance where a toy row reports nats and SW2.
IMAGE_KEYS = {"test_nll": "test_bpd", "bound_nll": "bound_bpd", "bound_gap": "bound_gap_bpd", "sw2": "fcd"}


def run_config(dataset, overrides, seed, n_iters=None):
    image = dataset in IMAGE_BASES
    n_iters = n_iters or DEFAULT_ITERS[dataset if image else "toy"]
    config = IMAGE_BASES[dataset]() if image else vp_eight_gaussians.get_config()
    config.seed = seed
    config.data.dataset = dataset
    config.training.n_iters = n_iters
    config.training.snapshot_freq = n_iters
    config.eval.begin_ckpt = config.eval.end_ckpt = 1
    config.eval.enable_fpe = config.eval.enable_conservativity = config.eval.enable_bound = True
    if not image:
        config.sampling.num_samples = config.eval.num_test
    for key, value in overrides.items():
        section, *path = key.split(".")
        node = config[section]
        for name in path[:-1]:
            node = node[name]
        node[path[-1]] = value
    return config


def loss_spread(setup, params, n_batches=200):
    """Standard deviations and means over n_batches minibatches (of the training batch size) of the likelihood-
    weighted DSM loss, t uniform vs t ~ q(t) (the same expectation: losses.py's likelihood_importance estimator)."""
    batch_size = setup.config.training.batch_size
    score_fn = setup.score_fn(params)
    data = jnp.asarray(setup.dataset.test_data)
    spread = {}
    for name, weighting in (("uniform", "likelihood"), ("importance", "likelihood_importance")):
        def batch_loss(key):
            x_key, loss_key = jax.random.split(key)
            x = data[jax.random.randint(x_key, (batch_size,), 0, data.shape[0])]
            return jnp.mean(losses.dsm_loss(loss_key, setup.sde, score_fn, x, weighting=weighting,
                                            eps=setup.config.training.eps))
        # lax.map, not vmap: one minibatch at a time keeps an image model's activations to one batch's.
        values = jax.jit(lambda keys: jax.lax.map(batch_loss, keys))(jax.random.split(jax.random.PRNGKey(7), n_batches))
        spread[f"loss_sd_{name}"] = float(np.std(np.asarray(values), ddof=1))
        spread[f"loss_mean_{name}"] = float(np.mean(np.asarray(values)))
    return spread


def run_one(workdir, config, start=None, report_only=False):
    """Trains (or resumes) and evaluates one run; returns its metrics, cached in workdir/result.json (None for a
    missing one when report_only). start: the workdir of a finished run whose checkpoints a new run continues from
    (fine-tuning)."""
    path = os.path.join(workdir, "result.json")
    if report_only and not os.path.exists(path):
        return None
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        if result.get("n_iters", config.training.n_iters) != config.training.n_iters:
            raise ValueError(f"{path} holds a run of {result['n_iters']} steps, not {config.training.n_iters}: "
                             f"pass --n_iters={result['n_iters']} or use another --workdir.")
        return result
    if start is not None and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        for folder in ("checkpoints", "checkpoints-meta"):
            shutil.copytree(os.path.join(start, folder), os.path.join(workdir, folder))
    clock = time.perf_counter()
    run_lib.train(config, workdir)
    train_seconds = time.perf_counter() - clock
    run_lib.evaluate(config, workdir)
    result = run_lib.read_metrics(os.path.join(workdir, "eval", "metrics.jsonl"))[-1]
    setup = run_lib.Setup(config)
    state, _ = run_lib.restore_latest(workdir, config, setup)
    if setup.dataset.levels is None:   # a toy: SW2 of samples; images have the eval's classifier distance
        samples, _ = run_lib.draw_samples(setup, state.ema_params, jax.random.PRNGKey(config.seed + 1000))
        directions = evaluation.unit_directions(2, 256, seed=0)
        result["sw2"] = evaluation.sliced_w2(np.asarray(samples, np.float64), setup.dataset.test_data, directions)
    else:
        result["bound_gap_bpd"] = result["bound_bpd"] - result["test_bpd"]
    result.update(train_seconds=train_seconds, n_iters=config.training.n_iters,
                  bound_gap=result["bound_nll"] - result["test_nll"], **loss_spread(setup, state.ema_params))
    with open(path, "w") as f:
        json.dump(result, f)
    return result


def sw2_floor(config, draws=10):
    """(mean, s.d.) over `draws` sets of as many fresh points of the true density of their SW2 to the held-out
    points: the metric's value for a perfect sampler at this sample size."""
    dataset = run_lib.datasets.get_dataset(config)
    sample = run_lib.datasets.TOY_DATASETS[config.data.dataset](config.data).sample
    values = [evaluation.sliced_w2(np.asarray(sample(jax.random.PRNGKey(12345 + k), len(dataset.test_data)),
                                              np.float64), dataset.test_data, evaluation.unit_directions(2, 256, 0))
              for k in range(draws)]
    return float(np.mean(values)), float(np.std(values, ddof=1))


def table(study, results, floors):
    """Markdown: a row per (dataset, arm) with mean ± s.d. over its seeds of each column."""
    columns = COLUMNS[study]
    lines = ["| dataset | arm | seeds | " + " | ".join(c for c, _, _ in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for (dataset, arm), runs in results.items():
        cells = []
        for _, key, fmt in columns:
            key = IMAGE_KEYS.get(key, key) if dataset in IMAGE_BASES else key
            values = np.array([r[key] for r in runs])
            cells.append(f"{values.mean():{fmt}} ± {values.std(ddof=1) if len(values) > 1 else float('nan'):{fmt}}")
        seeds = ",".join(str(r["seed"]) for r in runs)
        lines.append(f"| {dataset} | {arm} | {seeds} | " + " | ".join(cells) + " |")
    lines.append("")
    if any(dataset in IMAGE_BASES for dataset, _ in results):
        lines.append("- image rows (" + ", ".join(sorted({d for d, _ in results if d in IMAGE_BASES})) + "): the NLL "
                     "columns are bits/dim (uniform dequantization) and the SW2 column is the Fréchet classifier "
                     "distance of 256 samples to the test digits (scripts/train_digit_classifier.py's classifier).")
    for dataset, floor in floors.items():
        entropy = ENTROPY.get(dataset, floor["entropy"])
        lines.append(f"- {dataset}: entropy of the true density {entropy:.3f} nats (the NLL of a perfect model); "
                     f"SW2 of fresh true samples {floor['sw2'][0]:.4f} ± {floor['sw2'][1]:.4f} (10 draws: a perfect "
                     f"sampler's value at this sample size).")
    lines.append("- mean ± sample s.d. over the row's seeds.")
    return "\n".join(lines)


def write_keeping_notes(path, text):
    """Writes text to path, followed by what the old file held from its notes marker on (the hand-written
    reading), or by the marker alone."""
    notes = _NOTES + "\n"
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if _NOTES in old:
            notes = old[old.index(_NOTES):]
    with open(path, "w") as f:
        f.write(text + "\n\n" + notes)


def write_report(path, study, body, command):
    machine = platform.processor() or platform.machine()
    header = (f"# {study} study (scripts/study.py)\n\nReproduce: `{command}`\n\nMachine: {machine}, {os.cpu_count()} "
              f"CPUs, jax {jax.__version__}. Every toy run: VP SDE, MLP (3 layers of 64), batch 256, 3,000 steps, "
              f"Adam lr 2e-3, EMA 0.995; eval on 2,000 held-out points. MNIST5K runs: configs/demo/mnist_ddpmpp.py "
              f"(VP, DDPM++ of 317k parameters, batch 16, 2,000 steps, lr 2e-3, EMA 0.995); eval on 32 test "
              f"digits.\n\n")
    write_keeping_notes(path, header + body)


def study_run(args, dataset, arm, overrides, seed):
    """(config, workdir, start) of one run of args.study; start is the finished run a fine-tuning run continues
    (trained first if missing), else None."""
    def workdir(study, arm):
        return os.path.join(args.workdir, study, dataset, arm.replace(" ", "_"), f"seed{seed}")

    if args.study not in FINETUNE_FROM:
        study, run_arm = SAME_RUN.get((args.study, arm), (args.study, arm))
        return run_config(dataset, overrides, seed, args.n_iters), workdir(study, run_arm), None
    source_study, source_arm = FINETUNE_FROM[args.study]
    source = run_config(dataset, studies(args.fp_weight, args.fp_t_min)[source_study][source_arm], seed, args.n_iters)
    if not args.report_only:
        run_one(workdir(source_study, source_arm), source)
    config = run_config(dataset, overrides, seed, source.training.n_iters + args.finetune_iters)
    return config, workdir(args.study, arm), workdir(source_study, source_arm)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("weighting", "fp", "fp_finetune"), required=True)
    parser.add_argument("--fp_weight", type=float, default=0.15, help="config.training.fp.weight (FP-Diffusion's "
                        "α = 0.15 is 0.075 on a 2-D toy, 4.88e-7 on MNIST: 2α/D²)")
    parser.add_argument("--fp_t_min", type=float, default=0.0, help="the FP term applies for t >= this")
    parser.add_argument("--datasets", default="eight_gaussians,checkerboard", help="add MNIST5K for the image rows")
    parser.add_argument("--finetune_iters", type=int, default=400, help="fp_finetune: steps added to the run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n_iters", type=int, default=None, help="default 3,000 (toys), 2,000 (MNIST5K)")
    parser.add_argument("--workdir", default="runs/studies")
    parser.add_argument("--output", default=None, help="default results/<study>.md")
    parser.add_argument("--report_only", action="store_true", help="write the table from the finished runs only; "
                        "train nothing")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    results, floors = {}, {}
    for dataset in args.datasets.split(","):
        probe = "rademacher" if dataset in IMAGE_BASES else "exact"
        for arm, overrides in studies(args.fp_weight, args.fp_t_min, probe)[args.study].items():
            for seed in seeds:
                config, workdir, start = study_run(args, dataset, arm, overrides, seed)
                result = run_one(workdir, config, start, args.report_only)
                if result is None:
                    print(f"{args.study} {dataset} {arm} seed {seed}: not run yet, left out", flush=True)
                    continue
                result["seed"] = seed
                # The residual's t-bins are equal; bin 0 (t < 0.1) holds the ~1/σ⁴ growth near eps, which swamps
                # the mean, so the mean of the other bins is reported beside it.
                result["fpe_residual_late"] = float(np.mean([result[f"fpe_residual_t{k}"] for k in range(1, 10)]))
                results.setdefault((dataset, arm), []).append(result)
                print(f"{args.study} {dataset} {arm} seed {seed}: " +
                      ", ".join(f"{k} {result[IMAGE_KEYS.get(k, k) if dataset in IMAGE_BASES else k]:.4g}"
                                for _, k, _ in COLUMNS[args.study]), flush=True)
        if dataset not in IMAGE_BASES:
            config = run_config(dataset, {}, seeds[0], args.n_iters)
            entropy = next(iter(r for (d, _), runs in results.items() if d == dataset for r in runs)).get(
                "entropy", float("nan"))
            floors[dataset] = {"sw2": sw2_floor(config), "entropy": entropy}
    body = table(args.study, results, floors)
    if args.study in FINETUNE_FROM:
        body += (f"\n- fine-tuning: every run continues the {'/'.join(FINETUNE_FROM[args.study])} run of its seed "
                 f"from its final checkpoint for {args.finetune_iters} more steps (same data stream, optimizer "
                 f"state and EMA); the dsm arm is the control, the same steps without the regularizer.")
    command = "python " + " ".join(a for a in sys.argv if a != "--report_only")
    write_report(args.output or os.path.join("results", f"{args.study}.md"), args.study, body, command)


if __name__ == "__main__":
    main()
