"""Training throughput: examples/s and step time of the full train step (loss, gradient, Adam, EMA).

    python benchmarks/train_throughput.py [--configs configs/demo/mnist_ddpmpp.py,configs/vp/cifar10_ddpmpp_continuous.py]
                                          [--batch 8] [--steps 5]

Each config runs its own train step (losses.get_step_fn, one update per call, jitted; the same function
run_lib trains with) on random data of its shape at batch --batch (default: 8, the issue's comparison point;
0 keeps the config's batch size), timed over --steps calls after one warm-up call. One line per config with the
parameter count and the forward FLOPs per example (run_lib.summary), the achieved GFLOP/s counting a train step as
3x the forward FLOPs (forward + backward), and, for comparison across machines, that rate as a fraction of a
float32 1024x1024 matmul's GFLOP/s measured in the same run on the same device.
"""
import argparse
import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402
import models  # noqa: E402
import run_lib  # noqa: E402
import sde_lib  # noqa: E402

DEFAULT_CONFIGS = "configs/demo/mnist_ddpmpp.py,configs/vp/cifar10_ddpmpp_continuous.py"


def load_config(path):
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def timed(fn, steps):
    """Mean seconds per call of fn() over `steps` calls after a warm-up call (which also compiles)."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def matmul_gflops(n=1024, steps=20):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    return 2 * n**3 / timed(lambda: matmul(a), steps) / 1e9


def train_step(config):
    """(jitted step_fn, initial state, batch, rng): config's train step (the function run_lib trains with) on
    random data of its shape at config.training.batch_size."""
    model, sde = models.create_model(config), sde_lib.get_sde(config)
    shape = (config.training.batch_size,) + run_lib.input_shape(config)
    rng = jax.random.PRNGKey(config.seed)
    state = losses.init_train_state(rng, config, model, (1,) + shape[1:])
    step_fn = jax.jit(losses.get_step_fn(losses.get_loss_fn(config, sde, model), losses.get_optimizer(config),
                                         config.model.ema_rate), donate_argnums=0)
    return step_fn, state, jax.random.uniform(rng, shape, jnp.float32, -1.0, 1.0), rng


def train_step_seconds(config, steps, step=None):
    """Seconds per train step of config's model at config.training.batch_size on random data (step: the
    train_step(config) tuple, if already built)."""
    step_fn, state, batch, rng = step or train_step(config)
    holder = [state]

    def one_step():
        holder[0], metrics = step_fn(holder[0], batch, rng)
        return metrics["loss"]

    return timed(one_step, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    peak = matmul_gflops()
    print(f"device {jax.devices()[0].device_kind} x{jax.device_count()}: float32 1024^3 matmul {peak:.1f} GFLOP/s")
    for path in args.configs.split(","):
        config = load_config(path)
        if args.batch > 0:
            config.training.batch_size = args.batch
        config.training.n_jitted_steps = 1
        summary = run_lib.summary(config)
        seconds = train_step_seconds(config, args.steps)
        batch = config.training.batch_size
        gflops = 3 * summary["flops_per_example"] * batch / seconds / 1e9
        print(f"train {path} batch {batch}: {summary['params']:,} params, "
              f"{summary['flops_per_example'] / 1e9:.3f} GFLOP/example fwd | {seconds * 1e3:.1f} ms/step, "
              f"{batch / seconds:.1f} examples/s, {gflops:.1f} GFLOP/s = {gflops / peak:.2f} x matmul")


if __name__ == "__main__":
    main()
