"""Seed 003's objectives on images: energy models of the embedded MNIST digits trained by CD, persistent CD, sliced
and denoising score matching (configs/ebm/mnist.py), compared by their Langevin samples.

    python scripts/ebm_mnist.py [--objectives=cd,pcd,ssm,dsm] [--workdir=runs/ebm_mnist]

Each objective runs in workdir/<objective> through run_lib, as main.py would: --mode=train (resumable, so a rerun
continues or skips), --mode=sample (the 64-sample grid) and --mode=eval (Fréchet / kernel classifier distance and
classifier score of 128 Langevin samples against the 500 test digits, with the MNIST5K classifier of
scripts/train_digit_classifier.py; config.eval.classifier_weights). A reference row scores 128 training digits the
same way. Training time is the compiled steps' wall time from the run's metrics.jsonl (n steps / steps_per_sec per
log interval; compilation, evaluation and checkpoints excluded). results/ebm_mnist.md gets the table (its notes
below the table are kept across reruns), docs/ebm_mnist.png per objective 36 samples from noise and, below them,
36 test digits after the same chain (does the learned density keep digits where the chains from noise do not
reach them?), and docs/ebm_mnist_pcd_buffer.png 64 of PCD's persistent chains at the end of training.
"""
import argparse
import json
import os
import sys

import jax
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import evaluation  # noqa: E402
import losses  # noqa: E402
import run_lib  # noqa: E402
from configs.ebm import mnist  # noqa: E402
from models import energy  # noqa: E402
from scripts.study import write_keeping_notes  # noqa: E402

N_GRID = 36
LABELS = {"cd": "CD-20 (chains from data)", "pcd": "PCD-20 (replay buffer)", "ssm": "SSM-VR", "dsm": "DSM (σ 0.1)"}


def training_seconds(workdir):
    """Σ over the logged intervals of (steps in the interval) / steps_per_sec."""
    records = [r for r in run_lib.read_metrics(os.path.join(workdir, "metrics.jsonl")) if "steps_per_sec" in r]
    previous, total = 0, 0.0
    for r in records:
        total += (r["step"] - previous) / r["steps_per_sec"]
        previous = r["step"]
    return total, records[-1]


def last_eval(workdir):
    return run_lib.read_metrics(os.path.join(workdir, "eval", "metrics.jsonl"))[-1]


def chains_from_test_digits(config, workdir, n=N_GRID):
    """The first n test digits after the same Langevin chain as --mode=sample (sampling.langevin_sample's n_steps_each
    steps of ε): whether the model's density keeps digits, independently of whether chains from noise reach them."""
    setup = run_lib.Setup(config)
    state, _ = run_lib.restore_latest(workdir, config, setup)
    energy_fn = energy.get_energy_fn(setup.sde, setup.model, {"params": state.ema_params},
                                     continuous=config.training.continuous)
    s = config.sampling
    x, _ = losses.langevin_mcmc(jax.random.PRNGKey(config.seed), losses.at_time(energy_fn, s.eps),
                                jax.numpy.asarray(setup.dataset.test_data[:n]), s.n_steps_each, s.langevin_step_size)
    return np.asarray(x)


def save_replay_buffer(config, workdir, path, n=64):
    """PCD's persistent chains: the first n of the final checkpoint's replay buffer, as a grid."""
    setup = run_lib.Setup(config)
    state, _ = run_lib.restore_latest(workdir, config, setup)
    run_lib.save_image_grid(path, np.asarray(state.objective_state.samples[:n]), (0.0, 1.0))


def run_objective(objective, workdir):
    config = mnist.get_config(objective)
    run_lib.train(config, workdir)
    samples = run_lib.sample(config, workdir)
    if not os.path.exists(os.path.join(workdir, "eval", "metrics.jsonl")):
        run_lib.evaluate(config, workdir)
    seconds, last = training_seconds(workdir)
    row = {"objective": objective, "train_seconds": seconds, "train_loss": last["train_loss"],
           "steps": last["step"], **{k: v for k, v in last_eval(workdir).items() if k != "step"}}
    return row, (samples[:N_GRID], chains_from_test_digits(config, workdir))


def real_digits_row():
    """The classifier metrics of 128 training digits: what a perfect sampler would score with this evaluator."""
    config = mnist.get_config("dsm")
    dataset = datasets.get_dataset(config)
    quality = evaluation.sample_quality_evaluator(config, dataset.data_range, dataset.levels)
    train = dataset.to_float(dataset.train_levels[:config.eval.num_samples], 0.5)
    scores = dict(quality(jax.random.PRNGKey(0), [train], [dataset.reference_data()]))
    return {"objective": "real", **scores}


def table(rows):
    head = ("| objective | steps | train time (s) | final train loss | FCD ↓ | KCD ↓ | classifier score ↑ |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if r["objective"] == "real":
            lines.append(f"| 128 training digits (reference) | | | | {r['fcd']:.1f} | {r['kcd']:.2f} ± "
                         f"{r['kcd_se']:.2f} | {r['classifier_score']:.2f} |")
            continue
        lines.append(f"| {LABELS[r['objective']]} | {r['steps']} | {r['train_seconds']:.0f} | {r['train_loss']:.4g} | "
                     f"{r['fcd']:.1f} | {r['kcd']:.2f} ± {r['kcd_se']:.2f} | {r['classifier_score']:.2f} |")
    return head + "\n".join(lines) + "\n"


def _panel(images, label):
    label = label.replace("σ", "sigma")   # PIL's default bitmap font has no Greek letters
    grid = run_lib.image_grid(images, (0.0, 1.0), cols=6)
    image = Image.fromarray(grid.squeeze()).convert("L").resize((grid.shape[1] * 2, grid.shape[0] * 2),
                                                                Image.NEAREST)
    canvas = Image.new("L", (image.width, image.height + 16), 255)
    canvas.paste(image, (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), label, fill=0)
    return canvas


def figure(grids, path):
    """Per objective a column: on top 36 samples (chains from U[0, 1]), below the 36 chains from test digits."""
    columns = [(_panel(from_noise, LABELS[objective] + ": from noise"),
                _panel(from_data, LABELS[objective] + ": from test digits"))
               for objective, (from_noise, from_data) in grids]
    width, height = columns[0][0].width, columns[0][0].height
    out = Image.new("L", (len(columns) * (width + 8) - 8, 2 * height + 8), 255)
    for i, (top, bottom) in enumerate(columns):
        out.paste(top, (i * (width + 8), 0))
        out.paste(bottom, (i * (width + 8), height + 8))
    out.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", default="cd,pcd,ssm,dsm")
    parser.add_argument("--workdir", default="runs/ebm_mnist")
    args = parser.parse_args()
    rows, grids = [], []
    for objective in args.objectives.split(","):
        row, samples = run_objective(objective, os.path.join(args.workdir, objective))
        rows.append(row)
        grids.append((objective, samples))
        print(json.dumps(row), flush=True)
    rows.append(real_digits_row())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = f"python scripts/ebm_mnist.py --objectives={args.objectives}"
    write_keeping_notes(os.path.join(root, "results", "ebm_mnist.md"),
                        "# Energy-based models of the embedded MNIST digits (seed 003)\n\n"
                        f"`{command}` (configs/ebm/mnist.py; one seed, config.seed 42).\n\n" + table(rows))
    figure(grids, os.path.join(root, "docs", "ebm_mnist.png"))
    if "pcd" in args.objectives.split(","):
        save_replay_buffer(mnist.get_config("pcd"), os.path.join(args.workdir, "pcd"),
                           os.path.join(root, "docs", "ebm_mnist_pcd_buffer.png"))


if __name__ == "__main__":
    main()
