"""The training, evaluation and sampling loops, in the order of ARCHITECTURE.md's data flow.

config → `validate_config` → datasets (batch of step k = a pure function of (seed, k)) → model.init → TrainState
(params, opt_state, EMA, step) → restore the latest checkpoint → the jitted train step over a device mesh
(batch sharded on axis "data", state replicated) → every log_freq: metrics (TensorBoard + metrics.jsonl);
every eval_freq: the held-out loss; every snapshot_freq: a permanent checkpoint and a sample plot; every
snapshot_freq_for_preemption: the "meta" checkpoint that a killed run resumes from.

Randomness: PRNGKey(config.seed) is split once into the init / train / eval / sample streams, and the train step
folds the step count into its key (losses.get_step_fn). So a run resumed at step k computes exactly what an
uninterrupted run computes at step k, and the TrainState is all a checkpoint needs to hold.

Workdir layout: config.json, checkpoints/ (permanent, orbax), checkpoints-meta/ (latest only), tb/ and
metrics.jsonl (training metrics), samples/ (plots, .npz), eval/ (metrics.jsonl and TensorBoard of --mode eval),
dequantizer/ (--mode=train_dequantizer: its checkpoints/, checkpoints-meta/, tb/, metrics.jsonl and config.json).
"""
import copy
import functools
import json
import os
import sys
import tempfile
import time
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import datasets
import dequantization as dq
import evaluation
import likelihood
import losses
import models
import sampling
import sde_lib
from models import digit_classifier


class NonFiniteLossError(FloatingPointError):
    """The training loss or its gradient became NaN/inf: a user-fixable error (lower the learning rate)."""


# Errors that main.py reports as one line "error: ..." (a bad config or workdir, a diverged run).
USER_ERRORS = (ValueError, NonFiniteLossError)


# --- 1. The config and the workdir, checked before anything is compiled. ---

# (config key, test, what the value must be)
_FIELD_CHECKS = (
    [(key, lambda v: v > 0, "> 0") for key in (
        "training.batch_size", "training.log_freq", "training.eval_freq", "training.snapshot_freq",
        "training.snapshot_freq_for_preemption", "training.max_to_keep", "training.n_jitted_steps",
        "eval.batch_size", "eval.num_test", "sampling.num_samples", "sampling.shard_size", "model.num_scales")]
    + [("training.n_iters", lambda v: v >= 0, ">= 0"),
       ("model.ema_rate", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
       ("optim.lr", lambda v: v >= 0, ">= 0")])

# Quantities that the fused train steps (training.n_jitted_steps) must divide. n_iters need not: as in the
# reference, training stops at the first multiple of n_jitted_steps >= n_iters (1,300,005 for 1,300,001 and 5).
_JITTED_MULTIPLES = ("training.log_freq", "training.eval_freq", "training.snapshot_freq",
                     "training.snapshot_freq_for_preemption")


def _get(config, key):
    section, name = key.split(".")
    return config[section][name]


def _require(ok, message):
    if not ok:
        raise ValueError(message)


def validate_config(config):
    """Raises ValueError with a one-line message for any config value the run cannot use.

    Checks sizes and frequencies, the eps of training, sampling and evaluation against (0, T), the split of the
    batches over devices and hosts, and every name (SDE, weighting, objective, optimizer, model, sampling
    method, predictor, corrector) by constructing the pieces from the registries, and the sample-quality
    settings when config.eval.enable_sample_quality. The dataset name is checked when datasets.get_dataset
    builds it, which every mode does next, before anything is compiled.
    """
    for key, ok, what in _FIELD_CHECKS:
        _require(ok(_get(config, key)), f"config.{key} must be {what}, got {_get(config, key)}")
    n = config.training.n_jitted_steps
    for key in _JITTED_MULTIPLES:
        _require(_get(config, key) % n == 0, f"config.{key} = {_get(config, key)} must be a multiple of "
                                            f"config.training.n_jitted_steps = {n}")
    _require(config.eval.get("bpd_repeats", 1) > 0, f"config.eval.bpd_repeats must be > 0, got "
                                                    f"{config.eval.get('bpd_repeats')}")
    devices, hosts = jax.device_count(), jax.process_count()
    for key in ("training.batch_size", "eval.batch_size"):
        _require(_get(config, key) % devices == 0 and _get(config, key) % hosts == 0,
                 f"config.{key} = {_get(config, key)} must divide evenly over {devices} devices and {hosts} "
                 f"hosts; use a multiple of {devices}")
    sde = sde_lib.get_sde(config)
    for key in ("training.eps", "sampling.eps", "eval.eps"):
        _require(0.0 < _get(config, key) < sde.T, f"config.{key} must lie in (0, T) = (0, {sde.T}), "
                                                  f"got {_get(config, key)}")
    model = models.create_model(config)
    losses.get_weighting(config.training.weighting)
    losses.get_loss_fn(config, sde, model)
    losses.get_optimizer(config)
    for key, lookup in (("sampling.method", sampling.get_method), ("sampling.predictor", sampling.get_predictor),
                        ("sampling.corrector", sampling.get_corrector)):
        try:
            lookup(_get(config, key))
        except ValueError as e:
            raise ValueError(f"config.{key}: {e}") from None
    quality = config.eval.get("enable_sample_quality", False)
    if quality:
        evaluation.check_sample_quality_config(config)
    for section, size in [("sampling", "shard_size")] + [("eval", "batch_size")] * quality:
        shard = shard_plan(config[section].num_samples, config[section][size])[0]
        _require(shard % devices == 0, f"config.{section}: the shards of min({size}, num_samples) = {shard} samples "
                                       f"must divide evenly over {devices} devices; use multiples of {devices}")


def ensure_writable(directory):
    """Creates `directory` if needed and checks that a file can be written there; ValueError otherwise."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to {directory}: {e.strerror or e}") from None
    return directory


def _require_checkpoints(workdir):
    _require(os.path.isdir(os.path.join(workdir, "checkpoints")),
             f"no checkpoints in {workdir}; train first with --mode=train --workdir={workdir}")


def _save_config(config, workdir):
    """workdir/config.json, written on the first start only (a resumed run keeps the original)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(config.to_json(indent=2))


# --- 2. Data, model and state on a device mesh. ---

def make_mesh():
    """A 1-D mesh over all devices (all hosts' devices in a multi-host run), axis "data"."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def _batch_sharding(mesh, n_jitted_steps):
    """Batches [B, ...] (or [n, B, ...] for fused steps) are split over the mesh along B."""
    return NamedSharding(mesh, P("data") if n_jitted_steps == 1 else P(None, "data"))


def _global_batch(local, sharding, batch_axis):
    """Assembles the hosts' local batches into one global array sharded by `sharding`."""
    shape = list(local.shape)
    shape[batch_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, local, tuple(shape))


def train_batch(dataset, step, n_jitted_steps, sharding):
    """The global batch for the call that starts at `step`: [B, ...], or [n, B, ...] for n fused steps."""
    if n_jitted_steps == 1:
        return _global_batch(dataset.train_batch(step), sharding, 0)
    local = np.stack([dataset.train_batch(step + i) for i in range(n_jitted_steps)])
    return _global_batch(local, sharding, 1)


def _array_from_global(x, sharding):
    """A device array sharded by `sharding` from a host array that every host holds in full (e.g. test data)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _rng_streams(seed):
    """The run's independent rng streams, all derived from the seed."""
    names = ("init", "train", "eval", "sample", "entropy")
    return dict(zip(names, jax.random.split(jax.random.PRNGKey(seed), len(names))))


class Setup:
    """What every mode builds from the config: dataset, SDE, model, mesh, rng streams, the initial state."""

    def __init__(self, config):
        self.config = config
        self.dataset = datasets.get_dataset(config)
        self.sde = sde_lib.get_sde(config)
        self.model = models.create_model(config)
        self.mesh = make_mesh()
        self.replicated = NamedSharding(self.mesh, P())
        # One function object for every checkpoint, so jitted samplers that take score functions hit their cache.
        self._split_batch = functools.partial(_split_batch, sharding=NamedSharding(self.mesh, P("data")))
        self.rngs = _rng_streams(config.seed)
        init = functools.partial(losses.init_train_state, config=config, model=self.model,
                                 input_shape=(1,) + self.dataset.shape)
        self.initial_state = jax.jit(init, out_shardings=self.replicated)(self.rngs["init"])

    def score_fn(self, params):
        """The score function of `params` (a jax.tree_util.Partial: samplers trace the params, not retrace), its
        batch split over the mesh's devices (_split_batch)."""
        score_fn = models.get_score_fn(self.sde, self.model, {"params": params}, train=False,
                                       continuous=self.config.training.continuous)
        return score_fn if self.mesh.size == 1 else jax.tree_util.Partial(self._split_batch, score_fn)


def _split_batch(score_fn, x, t, *, sharding):
    """score_fn(x, t) with the batch x constrained to `sharding`: XLA's sharding propagation then splits the whole
    sampler or likelihood solve around it over the devices. Batches that do not divide evenly are left alone."""
    if x.ndim > 0 and x.shape[0] % sharding.mesh.size == 0:
        x = jax.lax.with_sharding_constraint(x, sharding)
    return score_fn(x, t)


# --- 3. Checkpoints (orbax): permanent ones and the preemption ("meta") one. ---

def checkpoint_managers(workdir, config, create=True):
    """(permanent, meta) orbax managers: workdir/checkpoints keeps training.max_to_keep, -meta keeps 1.

    Saves are asynchronous (the arrays are copied to host before save() returns); a killed save leaves only a
    temporary directory, which the next start removes, so the newest complete checkpoint is always usable.
    """
    def manager(name, keep):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=True,
                                               cleanup_tmp_directories=create)
        return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, name)), options=options,
                                     item_handlers=ocp.StandardCheckpointHandler())

    return manager("checkpoints", config.training.max_to_keep), manager("checkpoints-meta", 1)


def _latest(managers):
    """(step, manager) of the newest complete checkpoint over the managers (the first on ties), or (None, None)."""
    found = [(m.latest_step(), -i, m) for i, m in enumerate(managers) if m.latest_step() is not None]
    if not found:
        return None, None
    step, _, manager = max(found, key=lambda f: f[:2])
    return step, manager


def _param_shapes(tree):
    """{"Dense_0/kernel": shape, ...} of a parameter tree (arrays or orbax metadata)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): tuple(leaf.shape)
            for path, leaf in flat}


def _model_difference(saved, expected):
    """A short description of how two {path: shape} maps differ."""
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        return (f"the checkpoint has {len(saved)} parameter arrays, the config's model {len(expected)} "
                f"(only in the checkpoint: {extra[:3]}, only in the model: {missing[:3]})")
    path = next(p for p in sorted(expected) if saved[p] != expected[p])
    return f"parameter {path} has shape {saved[path]} in the checkpoint but {expected[path]} in the config's model"


def restore(manager, step, template, workdir):
    """The TrainState saved at `step`, replicated like `template`; ValueError if a different model made it."""
    metadata = manager.item_metadata(step)
    saved = _param_shapes(metadata["params"])
    expected = _param_shapes(template.params)
    if saved != expected:
        raise ValueError(f"checkpoint in {workdir} was made by a different model: "
                         f"{_model_difference(saved, expected)}; use a new --workdir")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
    try:
        if isinstance(template, losses.TrainState) and "objective_state" not in metadata:   # written before the field
            fields = {name: getattr(abstract, name) for name in ("step", "params", "opt_state", "ema_params")}
            return template.replace(**manager.restore(step, args=ocp.args.StandardRestore(fields)))
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except ValueError as e:
        raise ValueError(f"checkpoint in {workdir} does not match the training state built from the config "
                         f"(a different optimizer?): {str(e).splitlines()[0]}; use a new --workdir") from None


def restore_latest(workdir, config, setup):
    """The newest complete checkpoint's TrainState (meta or permanent) and its step; raises if there is none."""
    _require_checkpoints(workdir)
    step, manager = _latest(checkpoint_managers(workdir, config, create=False))
    _require(step is not None, f"no complete checkpoint in {workdir}; train first with --mode=train")
    return restore(manager, step, setup.initial_state, workdir), step


# --- 4. Metrics: TensorBoard, JSON lines, and the console. ---

class MetricWriter:
    """Scalars to a TensorBoard event file (tensorboardX) and one JSON object per line; only process 0 writes."""

    def __init__(self, jsonl_path, tb_dir):
        self._active = jax.process_index() == 0
        if self._active:
            from tensorboardX import SummaryWriter  # imported here: only the writing process needs it

            self._tb = SummaryWriter(tb_dir)
            self._jsonl = open(jsonl_path, "a")

    def write(self, step, scalars):
        if not (self._active and scalars):
            return
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        self._tb.flush()

    def close(self):
        if self._active:
            self._tb.close()
            self._jsonl.close()


def read_metrics(path):
    """The records a MetricWriter wrote to the JSON-lines file at path, oldest first."""
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines()]


class Progress:
    """A one-line display (step/s, loss, ETA) redrawn with carriage returns on a TTY; absl log lines otherwise."""

    def __init__(self, total_steps):
        self.total = total_steps
        self.tty = sys.stdout.isatty()

    def update(self, step, scalars):
        eta = (self.total - step) / max(scalars["steps_per_sec"], 1e-9)
        line = (f"step {step}/{self.total}  loss {scalars['train_loss']:.4f}  "
                f"{scalars['steps_per_sec']:.1f} step/s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        if self.tty:
            print("\r" + line, end="", flush=True)
        else:
            logging.info(line)

    def close(self):
        if self.tty:
            print(flush=True)


def drain_metrics(pending, n_jitted_steps, config, workdir):
    """Means of the step metrics collected since the last call; NonFiniteLossError if any step was not finite.

    pending: [(step reached, metrics on device)]. Fetching them is the loop's only host sync between logs.
    """
    fetched = jax.device_get(pending)
    for step, metrics in fetched:
        if metrics["nonfinite"] > 0:
            where = f"step {step}" if n_jitted_steps == 1 else f"steps {step - n_jitted_steps + 1}..{step}"
            lr = config.optim.lr
            raise NonFiniteLossError(
                f"training diverged: the loss or its gradient is not finite at {where} (loss = {metrics['loss']}); "
                f"lower the learning rate (config.optim.lr = {lr:g}, try --config.optim.lr={lr / 10:g}); "
                f"the checkpoints in {workdir} from before that step are kept")
    pending.clear()
    names = [k for k in fetched[0][1] if k != "nonfinite"]
    return {("train_" + k if k == "loss" else k): float(np.mean([m[k] for _, m in fetched])) for k in names}


# --- 5. Samples: the sampler of sampling.py on the EMA parameters, and a scatter plot. ---

def save_scatter(path, samples, data, title):
    """A PNG of the first two coordinates of data (left) and samples (right), on the data's axes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2))
    lim = 1.2 * float(np.abs(data[:, :2]).max())
    outside = int(np.sum(~np.all(np.abs(samples[:, :2]) <= lim, axis=1)))  # NaNs count as outside
    panels = [(data, f"data ({len(data)})"), (samples, f"samples ({len(samples)}, {outside} off the axes)")]
    for i, (points, name) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
        ax.set(title=name, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def image_grid(images, data_range, pad=2, cols=None):
    """uint8 [rows·(H+pad)+pad, cols·(W+pad)+pad, C] tiling of images [N, H, W, C] (values in data_range, clipped),
    row by row; cols defaults to ⌈√N⌉."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    low, high = data_range
    pixels = np.clip(np.nan_to_num((images - low) / (high - low), nan=0.0), 0.0, 1.0)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(np.round(pixels * 255).astype(np.uint8)):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad):(r + 1) * (h + pad), pad + q * (w + pad):(q + 1) * (w + pad)] = image
    return grid


def save_image_grid(path, samples, data_range, min_size=512, cols=None):
    """A PNG grid of image samples, enlarged (nearest neighbour) to at least min_size pixels."""
    from PIL import Image

    grid = image_grid(samples, data_range, cols=cols)
    scale = max(1, min_size // max(grid.shape[:2]))
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def save_sample_plot(path, samples, dataset, title):
    """An image grid (the file name carries the step) for images; a titled scatter plot beside the test data for
    vectors."""
    if len(dataset.shape) == 3:
        save_image_grid(path, samples, dataset.data_range)
    else:
        save_scatter(path, samples, dataset.test_data, title)


def draw_samples(setup, params, rng):
    """(samples [num_samples, ...] as numpy, nfe) from config.sampling with the score of `params`."""
    config = setup.config
    shape = (config.sampling.num_samples,) + setup.dataset.shape
    x, nfe = sampling.get_sampling_fn(config, setup.sde, shape)(rng, setup.score_fn(params))
    return np.asarray(x), int(nfe)


def snapshot_samples(setup, state, step, workdir):
    """The sample plot saved with a permanent checkpoint: workdir/samples/step_<step>.png."""
    x, nfe = draw_samples(setup, state.ema_params, jax.random.fold_in(setup.rngs["sample"], step))
    directory = ensure_writable(os.path.join(workdir, "samples"))
    save_sample_plot(os.path.join(directory, f"step_{step:08d}.png"), x, setup.dataset,
                     f"{setup.config.data.dataset}, step {step}, {setup.config.sampling.method} ({nfe} NFE)")


# --- 6. Training. ---

def _compile_train_step(setup, state, batch):
    """The train step of losses.get_step_fn, jitted with the mesh's shardings (state donated), compiled AOT."""
    config = setup.config
    step_fn = losses.get_step_fn(losses.get_loss_fn(config, setup.sde, setup.model), losses.get_optimizer(config),
                                 config.model.ema_rate, config.training.n_jitted_steps)
    jitted = jax.jit(step_fn, in_shardings=(setup.replicated, batch.sharding, setup.replicated),
                     out_shardings=setup.replicated, donate_argnums=0)
    return jitted.lower(state, batch, setup.rngs["train"]).compile()


def _eval_step(setup):
    """fn(state, step) -> held-out loss of the EMA parameters on the first eval.batch_size test points (fewer
    when the test split is smaller, rounded down to a multiple of the device count)."""
    config = setup.config
    eval_fn = losses.get_eval_fn(losses.get_loss_fn(config, setup.sde, setup.model, train=False))
    size = min(config.eval.batch_size, len(setup.dataset.test_data))
    size = max(size - size % jax.device_count(), jax.device_count())
    batch = _array_from_global(setup.dataset.test_data[:size], _batch_sharding(setup.mesh, 1))
    jitted = jax.jit(eval_fn, in_shardings=(setup.replicated, batch.sharding, setup.replicated),
                     out_shardings=setup.replicated)
    return lambda state, step: float(jitted(state, batch, jax.random.fold_in(setup.rngs["eval"], step))["loss"])


class _Checkpointer:
    """Saves the permanent and meta checkpoints on their schedules (at most one per step)."""

    def __init__(self, workdir, config):
        self.permanent, self.meta = checkpoint_managers(workdir, config)
        self.training = config.training

    def is_due(self, step):
        t = self.training
        return step % t.snapshot_freq == 0 or step >= t.n_iters or step % t.snapshot_freq_for_preemption == 0

    def save(self, step, state):
        """Saves `state` at `step`; returns whether it was a permanent checkpoint."""
        t = self.training
        permanent = step % t.snapshot_freq == 0 or step >= t.n_iters
        (self.permanent if permanent else self.meta).save(step, args=ocp.args.StandardSave(state))
        return permanent

    def close(self):
        for manager in (self.permanent, self.meta):
            manager.wait_until_finished()
            manager.close()


def train(config, workdir):
    """Trains config's model on config's data in `workdir`, resuming from its newest checkpoint if there is one.

    A run killed at any point (SIGKILL included) and restarted ends with bit-identical parameters to an
    uninterrupted one on the same machine: the data of step k and the rng of step k depend on (seed, k) only.
    """
    validate_config(config)
    ensure_writable(workdir)
    setup = Setup(config)
    checkpointer = _Checkpointer(workdir, config)
    try:
        state = _resume(setup.initial_state, checkpointer, workdir)
        _save_config(config, workdir)
        step = _train_loop(setup, state, checkpointer, workdir)
    finally:
        checkpointer.close()  # waits for the async saves
    logging.info("training finished at step %d; checkpoints in %s", step, workdir)


def _resume(template, checkpointer, workdir):
    """The newest checkpoint's state (shaped like `template`), or `template` when there is none."""
    step, manager = _latest((checkpointer.permanent, checkpointer.meta))
    if step is None:
        return template
    logging.info("resuming from the checkpoint of step %d in %s", step, manager.directory)
    return restore(manager, step, template, workdir)


class _Timer:
    """Training steps per second, not counting the time spent in evaluations, checkpoints and sample plots."""

    def __init__(self, step):
        self.reset(step)

    def reset(self, step):
        self.time, self.step = time.time(), step

    def rate(self, step):
        rate = (step - self.step) / max(time.time() - self.time, 1e-9)
        self.reset(step)
        return rate


def _train_loop(setup, state, checkpointer, workdir):
    config, t = setup.config, setup.config.training
    step, n = int(state.step), t.n_jitted_steps
    batch_sharding = _batch_sharding(setup.mesh, n)
    if step >= t.n_iters:
        logging.info("nothing to do: the checkpoint is at step %d >= n_iters = %d", step, t.n_iters)
        return step
    start = time.time()
    step_fn = _compile_train_step(setup, state, train_batch(setup.dataset, step, n, batch_sharding))
    eval_loss = _eval_step(setup)
    logging.info("compiled the train step in %.1f s; training steps %d..%d on %d device(s)",
                 time.time() - start, step + 1, t.n_iters, jax.device_count())
    writer = MetricWriter(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "tb"))
    progress, timer, pending = Progress(t.n_iters), _Timer(step), []
    try:
        while step < t.n_iters:
            state, metrics = step_fn(state, train_batch(setup.dataset, step, n, batch_sharding), setup.rngs["train"])
            step += n
            pending.append((step, metrics))
            due_log, due_eval = step % t.log_freq == 0, step % t.eval_freq == 0
            due_checkpoint = checkpointer.is_due(step)
            scalars = {}
            if due_log or due_checkpoint:  # the finiteness check comes before any checkpoint is written
                scalars.update(drain_metrics(pending, n, config, workdir), steps_per_sec=timer.rate(step))
                progress.update(step, scalars)
            if due_eval:
                scalars["eval_loss"] = eval_loss(state, step)
            writer.write(step, scalars)
            if due_checkpoint and checkpointer.save(step, state) and t.snapshot_sampling:
                snapshot_samples(setup, state, step, workdir)
            if due_eval or due_checkpoint:
                timer.reset(step)
    finally:
        progress.close()
        writer.close()
    return step


# --- 7. Resumable results: each shard of samples and each batch of likelihoods is a file of its own. ---

def _read_npz(path):
    """The arrays of an .npz file as a dict, or None when it is absent or unreadable."""
    try:
        with np.load(path) as f:
            return {name: f[name] for name in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def resumable(path, compute, complete, settings):
    """The arrays saved at `path` when they were made with the same `settings` (a string: everything the result
    depends on besides the checkpoint) and complete(arrays) says they are a finished result; else compute()'s dict
    of arrays, which process 0 saves with the settings under a temporary name and renames: a killed run leaves the
    whole file or none, its rerun computes only what is missing, and a rerun with other settings recomputes.
    Returns (arrays, whether they were read)."""
    saved = _read_npz(path)
    if saved is not None and str(saved.get("settings")) == settings and complete(saved):
        return saved, True
    result = {name: np.asarray(value) for name, value in compute().items()}
    result["settings"] = np.asarray(settings)
    if jax.process_index() == 0:
        partial = path[:-len(".npz")] + ".partial.npz"
        np.savez(partial, **result)
        os.replace(partial, path)
    return result, False


def to_host(x):
    """A numpy copy of x, gathered from every host when it is sharded over several."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


# --- 8. Evaluation: bits/dim by the probability-flow ODE, FID / IS / KID, and the evaluators of evaluation.py. ---

def _batches(data, batch_size):
    return [data[i:i + batch_size] for i in range(0, len(data), batch_size)]


def _padded_batches(n, batch_size):
    """Index arrays of the batches of n items, the last one filled up by wrapping around to the first items, so
    every batch has the same shape (one compilation, an even split over devices)."""
    return [np.arange(i, i + batch_size) % n for i in range(0, n, batch_size)]


def _exact_divergence(config, dim):
    """config.eval.exact_divergence if set, else exact for D <= 16 (D Jacobian-vector products per evaluation)."""
    exact = config.eval.get("exact_divergence")
    return dim <= 16 if exact is None else bool(exact)


def _per_example_results(rng, config, dataset, directory, compute, settings):
    """{name: [repeats, N]} of per-example results over config.eval.bpd_repeats passes over the held-out split.

    Repeat r takes the split as dataset.test_split(r) (a fresh dequantization draw for r > 0); batch b of it is
    compute(key, x) -> {name: [batch]} with key fold_in(rng, r·batches + b), saved as directory/r<r>_b<b>.npz with
    the settings string and read back on a rerun with the same settings (resumable). Batches are padded to one
    size by wrapping around (one compilation, an even split over devices); the padding is dropped.
    """
    n = len(dataset.test_data)
    size = min(config.eval.batch_size, n)
    index = _padded_batches(n, size)
    repeats = config.eval.get("bpd_repeats", 1)
    results = {}
    os.makedirs(directory, exist_ok=True)
    for r in range(repeats):
        data = dataset.test_split(r)
        for b, idx in enumerate(index):
            key = jax.random.fold_in(rng, r * len(index) + b)
            path = os.path.join(directory, f"r{r:03d}_b{b:05d}.npz")
            saved, _ = resumable(path, lambda: compute(key, jnp.asarray(data[idx])),
                                 lambda arrays: all(v.shape == (size,) for k, v in arrays.items() if k != "settings"),
                                 settings)
            kept = min(size, n - b * size)
            for name, value in saved.items():
                if name != "settings":
                    results.setdefault(name, np.zeros((repeats, n)))[r, idx[:kept]] = value[:kept]
    return results


def _evaluation_settings(config, **extra):
    """The settings string of a saved per-batch result: everything it depends on besides the checkpoint."""
    e = config.eval
    return json.dumps({"seed": config.seed, "examples": e.num_test, "batch": e.batch_size, "eps": e.eps,
                       "data": config.data.to_dict(), **extra}, sort_keys=True, default=str)


def ode_settings(config, dataset):
    """The likelihood.log_likelihood options of config.eval: exact_divergence (_exact_divergence), hutchinson_type
    (default rademacher), rtol, atol, eps, solver (default tsit5)."""
    e = config.eval
    return dict(exact_divergence=_exact_divergence(config, int(np.prod(dataset.shape))),
                hutchinson_type=e.get("hutchinson_type", "rademacher"), rtol=e.rtol, atol=e.atol, eps=e.eps,
                solver=e.get("solver", "tsit5"))


def test_nll(rng, config, sde, score_fn, dataset, directory):
    """{"nll": -log p(x) [repeats, N] in nats by the probability-flow ODE (SPEC §4), "nfe": the NFE of the solve of
    each example's batch [repeats, N]} over the held-out split (see _per_example_results; resumable)."""
    options = ode_settings(config, dataset)

    def solve(key, x):
        logp, _, count = likelihood.log_likelihood(key, sde, score_fn, x, **options)
        return {"nll": -to_host(logp).astype(np.float64), "nfe": np.full(x.shape[0], float(to_host(count)))}

    return _per_example_results(rng, config, dataset, directory, solve,
                                _evaluation_settings(config, method="ode", **options))


def bound_settings(config):
    """The likelihood_bound options of config.eval: bound_n_t time samples per example (default 1000),
    bound_importance (t ~ q(t) ∝ g²/σ², default True), bound_eps (default eval.eps), bound_t_chunk (default 8)."""
    e = config.eval
    return dict(n_t=e.get("bound_n_t", 1000), importance_sampling=e.get("bound_importance", True),
                eps=e.get("bound_eps", e.eps), t_chunk=e.get("bound_t_chunk", 8))


def test_bound(rng, config, sde, score_fn, dataset, directory):
    """{"nll": seed 001's upper bound on the SDE model's -log p(x) [repeats, N] in nats (likelihood.
    likelihood_bound, DSM form), "mc_se": its Monte-Carlo standard error per example} (resumable)."""
    options = bound_settings(config)

    def bound(key, x):
        value, se = likelihood.likelihood_bound(key, sde, score_fn, x, **options)
        return {"nll": to_host(value).astype(np.float64), "mc_se": to_host(se).astype(np.float64)}

    return _per_example_results(rng, config, dataset, directory, bound,
                                _evaluation_settings(config, method="bound", **options))


def _se(v):
    return float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")


def _likelihood_scalars(nll, dataset, prefix):
    """{prefix_nll, prefix_nll_se and, for discrete data, prefix_bpd, prefix_bpd_se}: the mean over examples of
    each example's mean over repeats, with the standard error over examples (SPEC §4)."""
    per_example = nll.mean(axis=0)
    scalars = {f"{prefix}_nll": float(per_example.mean()), f"{prefix}_nll_se": _se(per_example)}
    if dataset.levels is not None:
        bpd = np.asarray(likelihood.bits_per_dim(-per_example, dataset.shape, dataset.data_range, dataset.levels))
        scalars.update({f"{prefix}_bpd": float(bpd.mean()), f"{prefix}_bpd_se": _se(bpd)})
    return scalars


def _nll_scalars(results, dataset, config):
    """Test NLL and (for discrete data) bits/dim by the ODE, the evaluation's settings beside them (SPEC §4), and the
    true density's NLL where the dataset has one."""
    e, nll = config.eval, results["nll"]
    scalars = {**_likelihood_scalars(nll, dataset, "test"), "nll_nfe": float(results["nfe"].mean()),
               "nll_examples": float(nll.shape[1]), "nll_repeats": float(nll.shape[0]), "nll_eps": float(e.eps),
               "nll_rtol": float(e.rtol), "nll_atol": float(e.atol)}
    if dataset.levels is not None:
        low, high = dataset.data_range
        scalars["bpd_offset"] = float(np.log2(dataset.levels / (high - low)))
    if dataset.density is not None:
        true_nll = -np.asarray(dataset.density.log_prob(jnp.asarray(dataset.test_data)), np.float64)
        scalars["test_nll_true_density"] = float(true_nll.mean())
    return scalars


def _bound_scalars(results, dataset, config):
    """The bound in nats (and bits/dim), with the standard error over examples, its mean Monte-Carlo standard
    error per example, and its settings."""
    options = bound_settings(config)
    return {**_likelihood_scalars(results["nll"], dataset, "bound"),
            "bound_mc_se_per_example": float(results["mc_se"].mean()), "bound_n_t": float(options["n_t"]),
            "bound_importance": float(options["importance_sampling"]), "bound_eps": float(options["eps"])}


def _evaluators(config, sde, dataset):
    """(the run functions of evaluation.get_evaluators without its NLL evaluator, which evaluate() replaces by
    test_nll; the FID / IS / KID scorer of evaluation.sample_quality_evaluator when config.eval.
    enable_sample_quality, else None). The scorer loads its feature networks' weights here, before any sampling."""
    quiet = copy.deepcopy(config)
    with quiet.unlocked():
        quiet.eval.enable_bpd = False
    quality = None
    if config.eval.get("enable_sample_quality", False):
        quality = evaluation.sample_quality_evaluator(config, dataset.data_range, dataset.levels)
    return evaluation.get_evaluators(quiet, sde), quality


def _eval_steps(config, managers):
    """The checkpoint steps to evaluate: permanent checkpoints k·snapshot_freq for k in begin_ckpt..end_ckpt
    (score-SDE's numbering), or only the newest checkpoint when config.eval.end_ckpt < 0."""
    e, freq = config.eval, config.training.snapshot_freq
    if e.end_ckpt < 0:
        return [_latest(managers)]
    steps = [s for s in managers[0].all_steps() if e.begin_ckpt * freq <= s <= e.end_ckpt * freq]
    _require(steps, f"no checkpoint with step in [{e.begin_ckpt * freq}, {e.end_ckpt * freq}] (config.eval."
                    f"begin_ckpt..end_ckpt x snapshot_freq); saved steps: {managers[0].all_steps()}; set "
                    "--config.eval.end_ckpt=-1 for the newest")
    return [(s, managers[0]) for s in sorted(steps)]


def evaluate(config, workdir, eval_folder="eval"):
    """Evaluates the checkpoints of `workdir` (see _eval_steps): the test NLL / bits/dim (test_nll), the FID / IS /
    KID of config.eval.num_samples samples, and config's other evaluators (FPE residual, conservativity); writes
    workdir/eval_folder/metrics.jsonl and TensorBoard. Each checkpoint's likelihood batches and sample shards are
    kept in eval_folder/step_<step>/, so an interrupted evaluation resumes where it stopped."""
    validate_config(config)
    _require_checkpoints(workdir)
    eval_dir = ensure_writable(os.path.join(workdir, eval_folder))
    setup = Setup(config)
    dequantizer = restore_dequantizer(config, workdir, setup) if config.eval.get("dequantizer", False) else None
    evaluators, quality = _evaluators(config, setup.sde, setup.dataset)
    managers = checkpoint_managers(workdir, config, create=False)
    entropy = None
    if setup.dataset.density is not None:
        entropy = setup.dataset.density.entropy(setup.rngs["entropy"])
    writer = MetricWriter(os.path.join(eval_dir, "metrics.jsonl"), eval_dir)
    try:
        for step, manager in _eval_steps(config, managers):
            _require(step is not None, f"no complete checkpoint in {workdir}; train first with --mode=train")
            state = restore(manager, step, setup.initial_state, workdir)
            scalars = _evaluate_state(setup, state, step, evaluators, quality,
                                      os.path.join(eval_dir, f"step_{step:08d}"), dequantizer)
            if entropy is not None:
                scalars.update(entropy=float(entropy[0]), entropy_se=float(entropy[1]))
            writer.write(step, scalars)
            _log_eval(step, scalars)
    finally:
        writer.close()


def _evaluate_state(setup, state, step, evaluators, quality, directory, dequantizer=None):
    """The eval scalars of one checkpoint. rng = the eval stream folded with the step: the test NLL uses it, the
    evaluators it folded with their position from 1, the sample-quality samples it folded with _QUALITY_SAMPLES, the
    bound with _BOUND, the variational bits/dim of `dequantizer` (restore_dequantizer; None: off) with _DEQUANTIZER."""
    config, rng = setup.config, jax.random.fold_in(setup.rngs["eval"], step)
    score_fn = setup.score_fn(state.ema_params)
    scalars, uniform = {}, {}  # uniform: -log p [repeats, N] of the uniformly dequantized split, by method
    if config.eval.get("enable_bpd", True):
        results = test_nll(rng, config, setup.sde, score_fn, setup.dataset, os.path.join(directory, "nll"))
        scalars.update(_nll_scalars(results, setup.dataset, config))
        uniform["ode"] = results["nll"]
    if config.eval.get("enable_bound", False):
        results = test_bound(jax.random.fold_in(rng, _BOUND), config, setup.sde, score_fn, setup.dataset,
                             os.path.join(directory, "bound"))
        scalars.update(_bound_scalars(results, setup.dataset, config))
        uniform["bound"] = results["nll"]
    if dequantizer is not None:
        scalars.update(_variational_scalars(jax.random.fold_in(rng, _DEQUANTIZER), setup, score_fn, dequantizer,
                                            uniform, directory))
    batches = _batches(setup.dataset.test_data, config.eval.batch_size)
    for i, run in enumerate(evaluators):
        scalars.update({name: float(v) for name, v in run(jax.random.fold_in(rng, i + 1), score_fn, batches)})
    if quality is not None:
        e = config.eval
        shards = sample_shards(setup, state.ema_params, jax.random.fold_in(rng, _QUALITY_SAMPLES), e.num_samples,
                               e.batch_size, os.path.join(directory, "samples"))
        pairs = quality(jax.random.fold_in(rng, len(evaluators) + 1), (x for x, _ in shards),
                        _reference_batches(setup.dataset, e.batch_size))
        scalars.update({name: float(v) for name, v in pairs})
    return scalars


_QUALITY_SAMPLES = 0x5A3  # fold_in tags outside the evaluators' positions
_BOUND = 0xB0D


def _reference_batches(dataset, batch_size):
    """The whole test split for FID / IS / KID, read only if the evaluator has no reference statistics yet."""
    yield from _batches(dataset.reference_data(), batch_size)


def _log_eval(step, scalars):
    if "test_nll" in scalars:
        truth = (f" (entropy of the true density {scalars['entropy']:.4f} ± {scalars['entropy_se']:.4f}; "
                 f"its NLL on these points {scalars['test_nll_true_density']:.4f})" if "entropy" in scalars else "")
        logging.info("step %d: test NLL = %.4f ± %.4f nats%s", step, scalars["test_nll"], scalars["test_nll_se"],
                     truth)
    if "test_bpd" in scalars:
        logging.info("step %d: test bits/dim = %.4f ± %.4f over %d examples x %d repeats (eps %g, rtol %g, atol %g, "
                     "mean NFE %.0f, offset %+.2f bits/dim)", step, scalars["test_bpd"], scalars["test_bpd_se"],
                     scalars["nll_examples"], scalars["nll_repeats"], scalars["nll_eps"], scalars["nll_rtol"],
                     scalars["nll_atol"], scalars["nll_nfe"], scalars["bpd_offset"])
    if "bound_nll" in scalars:
        unit, key = ("bits/dim", "bound_bpd") if "bound_bpd" in scalars else ("nats", "bound_nll")
        logging.info("step %d: likelihood bound (seed 001) = %.4f ± %.4f %s (%d time samples per point)", step,
                     scalars[key], scalars[key + "_se"], unit, scalars["bound_n_t"])
    if "vdeq_bpd" in scalars:
        gain = (f"; {scalars['vdeq_gain_bpd']:.4f} ± {scalars['vdeq_gain_bpd_se']:.4f} below uniform dequantization "
                "on the same images" if "vdeq_gain_bpd" in scalars else "")
        logging.info("step %d: variational dequantization (seed 001, dequantizer step %d) = %.4f ± %.4f bits/dim with "
                     "-log p by the %s%s", step, scalars["vdeq_step"], scalars["vdeq_bpd"], scalars["vdeq_bpd_se"],
                     "bound" if scalars["vdeq_bound"] else "ODE", gain)
    logging.info("step %d: %s", step, json.dumps(scalars))


# --- 9. Samples in shards: --mode=sample and the samples of FID / IS / KID. ---

def shard_plan(num_samples, shard_size):
    """(samples per shard, number of shards): every shard has min(shard_size, num_samples) samples (one compiled
    sampler); what the last one draws beyond num_samples is not used."""
    size = min(shard_size, num_samples)
    return size, -(-num_samples // size)


def sample_shards(setup, params, rng, num_samples, shard_size, directory):
    """Yields (samples [n_k, ...] numpy, nfe) of shards k = 0, 1, ... in order, the n_k summing to num_samples.

    Shard k is drawn with config.sampling from jax.random.fold_in(rng, k), its batch split over all devices
    (Setup.score_fn), and saved as directory/shard_<k>.npz (samples, nfe); a finished shard is read instead of
    drawn (resumable). So the samples depend on (rng, k, shard size), not on the number of devices or hosts (up to
    the float rounding of cross-device sums).
    """
    size, count = shard_plan(num_samples, shard_size)
    shape = (size,) + setup.dataset.shape
    sample_fn = sampling.get_sampling_fn(setup.config, setup.sde, shape)
    score_fn = setup.score_fn(params)
    config = setup.config
    sampler = {k: v for k, v in config.sampling.to_dict().items() if k != "num_samples"}  # more samples: more shards
    settings = json.dumps({"key": np.asarray(jax.random.key_data(rng)).tolist(), "sampling": sampler, "shard": size,
                           "sde": config.training.sde, "model": config.model.to_dict()}, sort_keys=True, default=str)
    os.makedirs(directory, exist_ok=True)
    for k in range(count):
        def draw():
            x, nfe = sample_fn(jax.random.fold_in(rng, k), score_fn)
            return {"samples": to_host(x), "nfe": to_host(nfe)}

        path = os.path.join(directory, f"shard_{k:05d}.npz")
        shard, read = resumable(path, draw, lambda saved: saved.get("samples", np.zeros(0)).shape == shape, settings)
        logging.info("shard %d/%d: %d samples, %d NFE, %s %s", k + 1, count, size, shard["nfe"],
                     "read from" if read else "saved to", path)
        yield shard["samples"][:num_samples - k * size], int(shard["nfe"])


def sample(config, workdir):
    """Draws config.sampling.num_samples samples from the newest checkpoint's EMA parameters in shards of
    config.sampling.shard_size (sample_shards) into workdir/samples/step_<step>/shard_<k>.npz, and plots the first
    _GRID_SIZE of them (images) or all (vectors) in workdir/samples/step_<step>.png. A rerun after an
    interruption draws only the missing shards. Returns the samples."""
    validate_config(config)
    _require_checkpoints(workdir)
    setup = Setup(config)
    state, step = restore_latest(workdir, config, setup)
    s = config.sampling
    directory = ensure_writable(os.path.join(workdir, "samples", f"step_{step:08d}"))
    shards = list(sample_shards(setup, state.ema_params, jax.random.fold_in(setup.rngs["sample"], step),
                                s.num_samples, s.shard_size, directory))
    x = np.concatenate([samples for samples, _ in shards])
    nfe = np.mean([n for _, n in shards])
    if jax.process_index() == 0:
        save_sample_plot(directory + ".png", x[:_GRID_SIZE] if x.ndim == 4 else x, setup.dataset,
                         f"{config.data.dataset}, step {step}, {s.method} ({nfe:.0f} NFE)")
    logging.info("%d samples (%.0f NFE per shard) of the step-%d checkpoint in %s/shard_*.npz; plot %s.png",
                 len(x), nfe, step, directory, directory)
    return x


_GRID_SIZE = 64  # images on the sample grid of --mode=sample


# --- 10. Controllable generation (score-SDE paper, Appendix I) with a trained image model. ---

# --mode=inpaint conditions: name -> (known(h, w, c) -> bool [H, W, C], True = kept, in the latent space x M of
# the transform M; M, None for the pixels themselves). "colour" is the score-SDE paper's colorization: the first
# coordinate of the decorrelated colour space, the grey level, is known; the two colour coordinates are drawn.
INPAINT_MASKS = {
    "right_half": (lambda h, w, c: np.broadcast_to((np.arange(w) < w // 2)[None, :, None], (h, w, c)), None),
    "bottom_half": (lambda h, w, c: np.broadcast_to((np.arange(h) < h // 2)[:, None, None], (h, w, c)), None),
    "centre": (lambda h, w, c: np.broadcast_to((~(np.abs(np.arange(h)[:, None] - h / 2 + 0.5) < h / 4)
                                                | ~(np.abs(np.arange(w)[None, :] - w / 2 + 0.5) < w / 4))[..., None],
                                               (h, w, c)), None),
    "colour": (lambda h, w, c: np.broadcast_to(np.arange(c) == 0, (h, w, c)), sampling.COLOR_DECORRELATION),
}


def inpaint(config, workdir, mask_name="right_half", n_images=8, n_draws=4):
    """Fills the hidden part (INPAINT_MASKS[mask_name]: pixels, or the colour of RGB images) of the first n_images
    test images n_draws times from the newest checkpoint's EMA parameters with sampling.get_inpainting_fn: NCSN's
    annealed Langevin inpainting for sampling.method "ald", else PC inpainting with config.sampling's predictor,
    corrector and snr, on config.model.num_scales noise levels. Writes workdir/samples/inpaint_<mask>_step_<step>
    .png, one row per image: the original, the input (hidden pixels at mid-range; for "colour" the grey image), the
    n_draws inpaintings. Returns them [n_images, n_draws, ...]."""
    validate_config(config)
    _require(mask_name in INPAINT_MASKS, f"unknown inpainting mask {mask_name!r}; choose one of "
                                         f"{sorted(INPAINT_MASKS)}")
    _require_checkpoints(workdir)
    setup = Setup(config)
    _require(len(setup.dataset.shape) == 3, f"inpainting needs image data; {config.data.dataset!r} is not images")
    known_fn, transform = INPAINT_MASKS[mask_name]
    h, w, c = setup.dataset.shape
    _require(transform is None or c == 3, f"inpainting mask {mask_name!r} needs RGB images; the data have {c} "
                                          "channel(s)")
    state, step = restore_latest(workdir, config, setup)
    images = setup.dataset.test_data[:n_images]
    known = known_fn(h, w, c)[None]
    data = np.repeat(images, n_draws, axis=0)
    x, nfe = sampling.get_inpainting_fn(config, setup.sde)(jax.random.fold_in(setup.rngs["sample"], step),
                                                           setup.score_fn(state.ema_params), data,
                                                           np.broadcast_to(known, data.shape), transform=transform)
    x = to_host(x).reshape((n_images, n_draws) + images.shape[1:])
    m = np.eye(c, dtype=np.float32) if transform is None else transform
    middle = np.full_like(images, np.mean(setup.dataset.data_range))
    shown = np.where(known, images @ m, middle @ m) @ m.T     # hidden latent coordinates at mid-range
    rows = np.concatenate([images[:, None], shown[:, None], x], axis=1)
    directory = ensure_writable(os.path.join(workdir, "samples"))
    path = os.path.join(directory, f"inpaint_{mask_name}_step_{step:08d}.png")
    save_image_grid(path, rows.reshape((-1,) + images.shape[1:]), setup.dataset.data_range, cols=n_draws + 2)
    logging.info("inpainted (%s) %d test images x %d draws (%d NFE each) from the step-%d checkpoint: %s", mask_name,
                 n_images, n_draws, nfe, step, path)
    return x


def class_conditional(config, workdir, classifier_path, scale=1.0, per_class=8):
    """per_class samples of each class from the newest checkpoint, by the conditional score s(x, t) + scale ∇x log
    p_t(y | x) with the time-dependent classifier of `classifier_path` (scripts/train_digit_classifier.py
    --noise_config; score-SDE paper, Appendix I) and config.sampling's sampler. Writes one row per class to
    workdir/samples/class_conditional_step_<step>.png; with config.eval.classifier_weights present, logs how often
    that (clean) classifier agrees with the requested class. Returns (samples [classes, per_class, ...], agreement
    or None)."""
    validate_config(config)
    _require(classifier_path, "--mode=class_conditional needs --classifier=<a time-dependent classifier of "
                              "scripts/train_digit_classifier.py --noise_config>")
    _require_checkpoints(workdir)
    module, params, meta = digit_classifier.load_classifier(classifier_path)
    setup = Setup(config)
    _require(module.noise_conditional and meta["image_shape"] == setup.dataset.shape
             and meta.get("sde") == config.training.sde.lower() and meta.get("centered") == config.data.centered,
             f"classifier {classifier_path} is not a time-dependent classifier of this config's images, SDE and data "
             f"range; train one with python scripts/train_digit_classifier.py --dataset={config.data.dataset} "
             f"--noise_config=<this config file> --output={classifier_path}")
    state, step = restore_latest(workdir, config, setup)

    def log_prob(x, t, y):
        logits = module.apply({"params": params}, x, t)["logits"]
        return jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]

    labels = jnp.repeat(jnp.arange(module.num_classes), per_class)
    score_fn = sampling.conditional_score_fn(setup.score_fn(state.ema_params), sampling.classifier_grad_fn(log_prob),
                                             labels, scale)
    shape = (len(labels),) + setup.dataset.shape
    x, nfe = sampling.get_sampling_fn(config, setup.sde, shape)(jax.random.fold_in(setup.rngs["sample"], step),
                                                                 score_fn)
    x = to_host(x)
    directory = ensure_writable(os.path.join(workdir, "samples"))
    path = os.path.join(directory, f"class_conditional_step_{step:08d}.png")
    save_image_grid(path, x, setup.dataset.data_range, cols=per_class)
    agreement = None
    if config.eval.get("classifier_weights") and os.path.isfile(config.eval.classifier_weights):
        (extractor,) = evaluation.get_feature_extractors(_with_features(config, "classifier"), setup.dataset.levels)
        _, logits = extractor.apply(evaluation.to_unit_range(x, setup.dataset.data_range, setup.dataset.levels))
        agreement = float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))
        logging.info("the clean classifier %s agrees with the requested class on %.1f%% of the samples",
                     config.eval.classifier_weights, 100 * agreement)
    logging.info("%d samples per class (scale %g, %d NFE) of the step-%d checkpoint: %s", per_class, scale, nfe,
                 step, path)
    return x.reshape((module.num_classes, per_class) + setup.dataset.shape), agreement


def _with_features(config, features):
    config = copy.deepcopy(config)
    with config.unlocked():
        config.eval.sample_quality_features = features
    return config


# --- 11. Model summary: parameters, shapes and FLOPs without data or initialization. ---

def input_shape(config):
    """The shape of one example: (image_size, image_size, num_channels) for images, (dim,) otherwise."""
    data = config.data
    if "image_size" in data:
        return (data.image_size, data.image_size, data.num_channels)
    return (data.dim,)


def summary(config):
    """Parameter count, every parameter's shape, and forward FLOPs per example (XLA's cost analysis of the
    un-optimized HLO: 2 per multiply-add of convolutions and matmuls, plus elementwise ops) of config's model.

    Nothing is initialized or compiled (jax.eval_shape and one lowering), so it takes seconds even for the
    largest configs. Returns {"params": int, "flops_per_example": float, "shapes": {path: shape}, ...}.
    """
    validate_config(config)
    model, sde = models.create_model(config), sde_lib.get_sde(config)
    shape = input_shape(config)
    state = jax.eval_shape(functools.partial(losses.init_train_state, config=config, model=model,
                                             input_shape=(1,) + shape), jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
    labels = sde.noise_labels(jnp.full((1,), sde.T / 2), config.training.continuous)
    forward = jax.jit(lambda params, x, labels: model.apply({"params": params}, x, labels, train=False))
    cost = forward.lower(state.params, x, labels).cost_analysis()
    output = jax.eval_shape(forward, state.params, x, labels)
    shapes = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    return {"model": config.model.name, "params": sum(int(np.prod(s)) for s in shapes.values()),
            "flops_per_example": float(cost["flops"]), "input_shape": shape, "output_shape": output.shape[1:],
            "shapes": shapes}


def print_summary(config, file=sys.stdout):
    """summary(config) as text: one line per parameter, then the totals."""
    s = summary(config)
    width = max(len(path) for path in s["shapes"])
    for path, shape in s["shapes"].items():
        print(f"{path:<{width}}  {str(shape):<22} {int(np.prod(shape)):>12,}", file=file)
    print(f"model {s['model']}: {s['params']:,} parameters; input {s['input_shape']} -> output "
          f"{s['output_shape']}; {s['flops_per_example'] / 1e9:.3f} GFLOP per example (forward)", file=file)
    return s


# --- 12. Variational dequantization (seed 001, SPEC §4): --mode=train_dequantizer and the variational bits/dim. ---

_DEQUANTIZER = 0xDE9  # fold_in tag of the flow's streams: of the train stream (training), of the step's eval key

# (config.dequantizer key, test, what the value must be)
_DEQUANTIZER_CHECKS = (
    [(key, lambda v: v > 0, "> 0") for key in ("num_couplings", "features", "lr", "num_steps", "batch_size",
                                                "snapshot_freq")]
    + [("warmup", lambda v: v >= 0, ">= 0"), ("n_t", lambda v: v >= 2, ">= 2 (the bound's Monte-Carlo estimate)")])


def _dequantizer_eps(config):
    """The bound's smallest time: config.dequantizer.eps, or training.eps when it is unset."""
    eps = config.dequantizer.eps
    return config.training.eps if eps is None else eps


def dequantizer_config(config):
    """The config that the flow trains with, after checking config.dequantizer: a copy of config with its
    training.batch_size, n_iters, snapshot_freq (both kinds), optim.lr and warmup, one step per call, and the
    training images at their bin centres, which dequantization.quantize maps back to the integers exactly. So
    Setup's dataset, _Checkpointer and losses.get_optimizer serve the flow as they serve the score model."""
    _require("dequantizer" in config, f"variational dequantization needs discrete data and a config.dequantizer "
                                      f"section (the image configs have one); config.data.dataset = "
                                      f"{config.data.dataset!r} has neither: toy data are continuous")
    validate_config(config)
    d = config.dequantizer
    for key, ok, what in _DEQUANTIZER_CHECKS:
        _require(ok(d[key]), f"config.dequantizer.{key} must be {what}, got {d[key]}")
    devices, T = jax.device_count(), sde_lib.get_sde(config).T
    _require(d.batch_size % devices == 0 and d.batch_size % jax.process_count() == 0,
             f"config.dequantizer.batch_size = {d.batch_size} must divide evenly over {devices} devices and "
             f"{jax.process_count()} hosts; use a multiple of {devices}")
    _require(0.0 < _dequantizer_eps(config) < T, f"config.dequantizer.eps must lie in (0, T) = (0, {T}), got "
                                                 f"{_dequantizer_eps(config)}")
    deq = copy.deepcopy(ml_collections.ConfigDict(config))
    t = deq.training
    t.batch_size, t.n_iters, t.n_jitted_steps = d.batch_size, d.num_steps, 1
    t.snapshot_freq = t.snapshot_freq_for_preemption = d.snapshot_freq
    deq.optim.lr, deq.optim.warmup = d.lr, d.warmup
    deq.data.uniform_dequantization = False
    return deq


def _require_levels(dataset, config):
    _require(dataset.levels is not None, f"variational dequantization needs discrete data; config.data.dataset = "
                                         f"{config.data.dataset!r} is continuous (no integer levels)")


def _dequantizer_model(config):
    return dq.Dequantizer(num_couplings=config.dequantizer.num_couplings, features=config.dequantizer.features)


def _abstract(tree, sharding):
    """The leaves' shapes and dtypes with `sharding`: a restore template that computes nothing."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _dequantizer_streams(setup):
    """(init, train) keys of the flow: from the run's train stream, apart from the score model's draws."""
    return tuple(jax.random.split(jax.random.fold_in(setup.rngs["train"], _DEQUANTIZER)))


def integer_batch(dataset, step, sharding):
    """The integers k [B, ...] (int32) of training batch `step` of a dataset served at bin centres (see
    dequantizer_config), sharded by `sharding`: a pure function of (seed, step) like the batch itself."""
    k = np.asarray(dq.quantize(dataset.train_batch(step), dataset.data_range, dataset.levels))
    return _global_batch(k, sharding, 0)


def train_dequantizer(config, workdir):
    """Fits config.dequantizer's flow q(u | k) (dequantization.Dequantizer; seed 001, SPEC §4) to the frozen EMA
    score of the newest checkpoint in `workdir`: dequantization.get_step_fn's Adam steps on the DSM form of seed
    001's bound, n_t times per image, on the quantized training batches. Writes workdir/dequantizer/ (checkpoints
    every dequantizer.snapshot_freq steps and at the end, metrics.jsonl and tb/: train_bpd, the batch's noisy
    variational bound before each update, averaged over log_freq steps) and resumes from its newest checkpoint.
    Step k's batch and key (fold_in(train key, k)) depend on (seed, k) only, so a run killed and restarted ends
    with the parameters of an uninterrupted one. Returns the final DequantizerState."""
    deq_config = dequantizer_config(config)
    _require_checkpoints(workdir)
    setup = Setup(deq_config)
    _require_levels(setup.dataset, config)
    score_state, score_step = restore_latest(workdir, deq_config, setup)
    directory = ensure_writable(os.path.join(workdir, "dequantizer"))
    model, optimizer, d = _dequantizer_model(config), losses.get_optimizer(deq_config), config.dequantizer
    init_rng, train_rng = _dequantizer_streams(setup)
    init = functools.partial(dq.init_state, init_rng, model, setup.dataset.shape, optimizer)
    template = _abstract(jax.eval_shape(init), setup.replicated)
    rep, batches = setup.replicated, _batch_sharding(setup.mesh, 1)
    update = dq.get_step_fn(model, optimizer, setup.sde, setup.dataset.data_range, setup.dataset.levels, n_t=d.n_t,
                            eps=_dequantizer_eps(config), importance_sampling=d.importance_sampling)
    step_fn = jax.jit(update, in_shardings=(rep, batches, rep, rep), out_shardings=rep, donate_argnums=0)
    score_fn = setup.score_fn(score_state.ema_params)
    checkpointer = _Checkpointer(directory, deq_config)
    try:
        _check_flow(*_latest((checkpointer.permanent, checkpointer.meta)), template, directory)
        state = _resume(template, checkpointer, directory)
        if state is template:  # a first start
            state = jax.device_put(init(), setup.replicated)
        _save_config(config, directory)
        logging.info("training the dequantizer, steps %d..%d, against the score checkpoint of step %d",
                     int(state.step) + 1, d.num_steps, score_step)
        state = _dequantizer_loop(setup, state, lambda s, k: step_fn(s, k, train_rng, score_fn), checkpointer,
                                  directory, score_step)
    finally:
        checkpointer.close()
    logging.info("dequantizer trained to step %d; checkpoints in %s", int(state.step), directory)
    return state


def _dequantizer_loop(setup, state, step_fn, checkpointer, directory, score_step):
    t, step = setup.config.training, int(state.step)
    sharding = _batch_sharding(setup.mesh, 1)
    writer = MetricWriter(os.path.join(directory, "metrics.jsonl"), os.path.join(directory, "tb"))
    timer, pending = _Timer(step), []
    try:
        while step < t.n_iters:
            state, metrics = step_fn(state, integer_batch(setup.dataset, step, sharding))
            step += 1
            pending.append(metrics)
            due_checkpoint = checkpointer.is_due(step)
            if step % t.log_freq == 0 or due_checkpoint:  # the finiteness check comes before any checkpoint
                scalars = {**_drain_dequantizer_metrics(pending, step, setup.config, directory),
                           "steps_per_sec": timer.rate(step), "score_step": float(score_step)}
                writer.write(step, scalars)
                logging.info("dequantizer step %d/%d: train bpd %.4f, %.2f step/s", step, t.n_iters,
                             scalars["train_bpd"], scalars["steps_per_sec"])
            if due_checkpoint:
                checkpointer.save(step, state)
                timer.reset(step)
    finally:
        writer.close()
    return state


def _drain_dequantizer_metrics(pending, step, config, directory):
    """Means of the steps' bpd and gradient norm since the last call; NonFiniteLossError if any is not finite."""
    fetched = jax.device_get(pending)
    pending.clear()
    bpd, grad_norm = (np.array([m[name] for m in fetched]) for name in ("bpd", "grad_norm"))
    if not (np.all(np.isfinite(bpd)) and np.all(np.isfinite(grad_norm))):
        lr = config.optim.lr
        raise NonFiniteLossError(f"dequantizer training diverged: the bound or its gradient is not finite in steps "
                                 f"{step - len(fetched) + 1}..{step}; lower config.dequantizer.lr = {lr:g} (try "
                                 f"--config.dequantizer.lr={lr / 10:g}); the checkpoints in {directory} from before "
                                 "those steps are kept")
    return {"train_bpd": float(bpd.mean()), "grad_norm": float(grad_norm.mean())}


def restore_dequantizer(config, workdir, setup):
    """(model, params, step) of the newest flow in workdir/dequantizer; a ValueError naming the command that trains
    one when there is none, or when the data are continuous or config.eval.dequantizer_nll is unknown."""
    deq_config = dequantizer_config(config)
    _require_levels(setup.dataset, config)
    method = config.eval.get("dequantizer_nll", "ode")
    _require(method in _VARIATIONAL_NLL, f"config.eval.dequantizer_nll must be one of {sorted(_VARIATIONAL_NLL)}, "
                                         f"got {method!r}")
    directory = os.path.join(workdir, "dequantizer")
    step, manager = None, None
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        step, manager = _latest(checkpoint_managers(directory, deq_config, create=False))
    _require(step is not None, f"config.eval.dequantizer = True but {directory} holds no trained dequantizer; train "
                               f"one first: python main.py --config=<this config> --workdir={workdir} "
                               "--mode=train_dequantizer")
    model = _dequantizer_model(config)
    template = _abstract(jax.eval_shape(functools.partial(dq.init_state, jax.random.PRNGKey(0), model,
                                                          setup.dataset.shape, losses.get_optimizer(deq_config))),
                         setup.replicated)
    _check_flow(step, manager, template, directory)
    return model, restore(manager, step, template, directory).params, step


def _check_flow(step, manager, template, directory):
    """ValueError unless the flow saved at `step` (None: nothing saved) has the parameter shapes of `template`."""
    if step is None:
        return
    saved, expected = _param_shapes(manager.item_metadata(step)["params"]), _param_shapes(template.params)
    if saved != expected:  # the message is built only then: _model_difference needs a difference
        raise ValueError(f"the dequantizer in {directory} was trained with other config.dequantizer settings "
                         f"({_model_difference(saved, expected)}); pass those of {directory}/config.json, or delete "
                         f"{directory} to train a new one")


class _HeldOutIntegers:
    """The held-out images as integers k [N, ...] for _per_example_results: the same k in every repeat (each
    repeat draws its own u ~ q(u | k))."""

    def __init__(self, dataset):
        self.test_data = dataset.test_levels

    def test_split(self, repeat=0):
        return self.test_data


# config.eval.dequantizer_nll -> (the -log p of dequantization: nll_fn(sde, score_fn, **options), its options)
_VARIATIONAL_NLL = {"ode": (dq.ode_nll_fn, ode_settings),
                    "bound": (dq.bound_nll_fn, lambda config, dataset: bound_settings(config))}


def test_variational_bpd(rng, config, sde, score_fn, dataset, dequantizer, directory):
    """{"bpd": [repeats, N]} dequantization.variational_bits_per_dim of the held-out integers (SPEC §4, seed 001):
    one u ~ q(u | k) of `dequantizer` (restore_dequantizer) per example and repeat, -log p by the ODE with
    test_nll's options or by seed 001's bound with test_bound's (config.eval.dequantizer_nll). Batch b of repeat r
    uses the key fold_in(rng, r·batches + b) and is saved and read back like test_nll's (_per_example_results)."""
    model, params, step = dequantizer
    method = config.eval.get("dequantizer_nll", "ode")
    make_nll, options = _VARIATIONAL_NLL[method]
    options = options(config, dataset)
    nll_fn = make_nll(sde, score_fn, **options)

    def compute(key, k):
        bpd = dq.variational_bits_per_dim(key, model, params, k, nll_fn, dataset.data_range, dataset.levels)
        return {"bpd": to_host(bpd).astype(np.float64)}

    settings = _evaluation_settings(config, method="variational_" + method, dequantizer_step=int(step),
                                    dequantizer=config.dequantizer.to_dict(), **options)
    return _per_example_results(rng, config, _HeldOutIntegers(dataset), directory, compute, settings)


def _variational_scalars(rng, setup, score_fn, dequantizer, uniform, directory):
    """vdeq_bpd ± vdeq_bpd_se over the held-out split (test_variational_bpd, files in directory/vdeq_<method>), the
    dequantizer's step and whether -log p was the bound; with the uniform -log p of the same method at hand
    (uniform[method] [repeats, N]), vdeq_gain_bpd ± se: uniform minus variational bits/dim, paired by image."""
    config, dataset = setup.config, setup.dataset
    method = config.eval.get("dequantizer_nll", "ode")
    results = test_variational_bpd(rng, config, setup.sde, score_fn, dataset, dequantizer,
                                   os.path.join(directory, "vdeq_" + method))
    bpd = results["bpd"].mean(axis=0)
    scalars = {"vdeq_bpd": float(bpd.mean()), "vdeq_bpd_se": _se(bpd), "vdeq_bound": float(method == "bound"),
               "vdeq_step": float(dequantizer[2])}
    if method in uniform:
        gain = np.asarray(likelihood.bits_per_dim(-uniform[method].mean(axis=0), dataset.shape, dataset.data_range,
                                                  dataset.levels), np.float64) - bpd
        scalars.update(vdeq_gain_bpd=float(gain.mean()), vdeq_gain_bpd_se=_se(gain))
    return scalars
