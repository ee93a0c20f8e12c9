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
metrics.jsonl (training metrics), samples/ (plots, .npz), eval/ (metrics.jsonl and TensorBoard of --mode eval).
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
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import datasets
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
    saved = _param_shapes(manager.item_metadata(step)["params"])
    expected = _param_shapes(template.params)
    if saved != expected:
        raise ValueError(f"checkpoint in {workdir} was made by a different model: "
                         f"{_model_difference(saved, expected)}; use a new --workdir")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
    try:
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
        state = _resume(setup, checkpointer, workdir)
        _save_config(config, workdir)
        step = _train_loop(setup, state, checkpointer, workdir)
    finally:
        checkpointer.close()  # waits for the async saves
    logging.info("training finished at step %d; checkpoints in %s", step, workdir)


def _resume(setup, checkpointer, workdir):
    step, manager = _latest((checkpointer.permanent, checkpointer.meta))
    if step is None:
        return setup.initial_state
    logging.info("resuming from the checkpoint of step %d in %s", step, manager.directory)
    return restore(manager, step, setup.initial_state, workdir)


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


def test_nll(rng, config, sde, score_fn, dataset, directory):
    """-log p(x) [repeats, N] in nats of the held-out split by the probability-flow ODE (SPEC §4), and the NFE of
    each solve [repeats, batches].

    Repeat r (of config.eval.bpd_repeats) takes the split as dataset.test_split(r) (a fresh dequantization draw for
    r > 0) and fresh Hutchinson probes: batch b of repeat r solves with jax.random.fold_in(rng, r·batches + b).
    Each (repeat, batch) is saved as directory/nll_r<r>_b<b>.npz and read back on a rerun (resumable).
    """
    e = config.eval
    n = len(dataset.test_data)
    size = min(e.batch_size, n)
    index = _padded_batches(n, size)
    exact = _exact_divergence(config, int(np.prod(dataset.shape)))
    repeats = e.get("bpd_repeats", 1)
    settings = json.dumps({"seed": config.seed, "examples": n, "batch": size, "exact": exact, "eps": e.eps,
                           "rtol": e.rtol, "atol": e.atol, "probe": e.get("hutchinson_type", "rademacher"),
                           "solver": e.get("solver", "tsit5"), "data": config.data.to_dict()}, sort_keys=True,
                          default=str)
    nll, nfe = np.zeros((repeats, n)), np.zeros((repeats, len(index)))
    os.makedirs(directory, exist_ok=True)
    for r in range(repeats):
        data = dataset.test_split(r)
        for b, idx in enumerate(index):
            def solve():
                logp, _, count = likelihood.log_likelihood(
                    jax.random.fold_in(rng, r * len(index) + b), sde, score_fn, jnp.asarray(data[idx]),
                    exact_divergence=exact, hutchinson_type=e.get("hutchinson_type", "rademacher"), rtol=e.rtol,
                    atol=e.atol, eps=e.eps, solver=e.get("solver", "tsit5"))
                return {"nll": -to_host(logp).astype(np.float64), "nfe": to_host(count)}

            path = os.path.join(directory, f"nll_r{r:03d}_b{b:05d}.npz")
            result, _ = resumable(path, solve, lambda saved: saved.get("nll", np.zeros(0)).shape == (size,),
                                  settings)
            kept = min(size, n - b * size)
            nll[r, idx[:kept]] = result["nll"][:kept]
            nfe[r, b] = result["nfe"]
    return nll, nfe


def _nll_scalars(nll, nfe, dataset, config):
    """Test NLL and (for discrete data) bits/dim: the mean over examples of each example's mean over repeats, with
    the standard error over examples; the evaluation's settings beside them (SPEC §4); the true density's NLL."""
    e = config.eval
    per_example = nll.mean(axis=0)
    se = lambda v: float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    scalars = {"test_nll": float(per_example.mean()), "test_nll_se": se(per_example), "nll_nfe": float(nfe.mean()),
               "nll_examples": float(nll.shape[1]), "nll_repeats": float(nll.shape[0]), "nll_eps": float(e.eps),
               "nll_rtol": float(e.rtol), "nll_atol": float(e.atol)}
    if dataset.levels is not None:
        bpd = np.asarray(likelihood.bits_per_dim(-per_example, dataset.shape, dataset.data_range, dataset.levels))
        low, high = dataset.data_range
        scalars.update(test_bpd=float(bpd.mean()), test_bpd_se=se(bpd),
                       bpd_offset=float(np.log2(dataset.levels / (high - low))))
    if dataset.density is not None:
        true_nll = -np.asarray(dataset.density.log_prob(jnp.asarray(dataset.test_data)), np.float64)
        scalars["test_nll_true_density"] = float(true_nll.mean())
    return scalars


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
                                      os.path.join(eval_dir, f"step_{step:08d}"))
            if entropy is not None:
                scalars.update(entropy=float(entropy[0]), entropy_se=float(entropy[1]))
            writer.write(step, scalars)
            _log_eval(step, scalars)
    finally:
        writer.close()


def _evaluate_state(setup, state, step, evaluators, quality, directory):
    """The eval scalars of one checkpoint. rng = the eval stream folded with the step: the test NLL uses it, the
    evaluators it folded with their position from 1, the sample-quality samples it folded with _QUALITY_SAMPLES."""
    config, rng = setup.config, jax.random.fold_in(setup.rngs["eval"], step)
    score_fn = setup.score_fn(state.ema_params)
    scalars = {}
    if config.eval.get("enable_bpd", True):
        nll, nfe = test_nll(rng, config, setup.sde, score_fn, setup.dataset, os.path.join(directory, "nll"))
        scalars.update(_nll_scalars(nll, nfe, setup.dataset, config))
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


_QUALITY_SAMPLES = 0x5A3  # a fold_in tag outside the evaluators' positions


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
    test images n_draws times from the newest checkpoint's EMA parameters: sampling.inpaint with config.sampling's
    predictor, corrector and snr on config.model.num_scales steps. Writes workdir/samples/inpaint_<mask>_step_<step>
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
    s = config.sampling
    x, nfe = sampling.inpaint(jax.random.fold_in(setup.rngs["sample"], step), setup.sde,
                              setup.score_fn(state.ema_params), data, np.broadcast_to(known, data.shape),
                              transform=transform, predictor=s.predictor, corrector=s.corrector, snr=s.snr,
                              n_steps=s.n_steps_each, denoise=s.noise_removal, eps=s.eps)
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
