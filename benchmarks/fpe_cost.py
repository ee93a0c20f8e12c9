"""Cost of the score Fokker-Planck regularizer: train step time and peak memory of DSM + FP against DSM alone.

    python benchmarks/fpe_cost.py [--configs configs/toy/vp_gmm.py,configs/demo/mnist_ddpmpp.py] [--batch 8]
                                  [--steps 5] [--probe rademacher]

For each config, the same train step (losses.get_step_fn: loss, gradient, Adam, EMA; jitted) is built twice: with
config.training.fp.weight = 0 (plain DSM, the baseline) and = 0.15 (FP-Diffusion's image default) with the given
probe. Step time is the mean over --steps calls after a compiling warm-up call on random data of the config's
shape; memory is the compiled step's temporary buffers (state donated, as run_lib trains) as XLA reports them
(memory_analysis: the live working set besides parameters and batch, a device-independent proxy for peak memory).
One line per config, with the ratios.
"""
import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402
from benchmarks.train_throughput import load_config, train_step, train_step_seconds  # noqa: E402

DEFAULT_CONFIGS = "configs/toy/vp_gmm.py,configs/demo/mnist_ddpmpp.py"


def step_cost(config, steps):
    """(seconds per train step, temporary bytes of the compiled step) on random data of config's shape."""
    step = train_step(config)
    step_fn, state, batch, rng = step
    memory = step_fn.lower(state, batch, rng).compile().memory_analysis()
    return train_step_seconds(config, steps, step), memory.temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--probe", default="rademacher", choices=losses.FP_PROBES)
    args = parser.parse_args()
    print(f"device {jax.devices()[0].device_kind} x{jax.device_count()}")
    for path in args.configs.split(","):
        config = load_config(path)
        config.training.batch_size, config.training.n_jitted_steps = args.batch, 1
        costs = {}
        for weight in (0.0, 0.15):
            config.training.fp.update(dict(weight=weight, probe=args.probe))
            costs[weight] = step_cost(config, args.steps)
        (dsm_s, dsm_mem), (fp_s, fp_mem) = costs[0.0], costs[0.15]
        print(f"fpe_cost {path} batch {args.batch} probe {args.probe}: DSM {dsm_s * 1e3:.1f} ms/step "
              f"{dsm_mem / 2**20:.1f} MiB | DSM+FP {fp_s * 1e3:.1f} ms/step {fp_mem / 2**20:.1f} MiB | "
              f"time x{fp_s / dsm_s:.2f}, memory x{fp_mem / max(dsm_mem, 1):.2f}")


if __name__ == "__main__":
    main()
