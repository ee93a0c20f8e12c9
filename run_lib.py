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

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import datasets
import evaluation
import likelihood
import losses
import models
import sampling
import sde_lib


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
        "eval.batch_size", "eval.num_test", "sampling.num_samples", "model.num_scales")]
    + [("training.n_iters", lambda v: v >= 0, ">= 0"),
       ("model.ema_rate", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
       ("optim.lr", lambda v: v >= 0, ">= 0")])

# Quantities that the fused train steps (training.n_jitted_steps) must divide.
_JITTED_MULTIPLES = ("training.n_iters", "training.log_freq", "training.eval_freq", "training.snapshot_freq",
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
    method, predictor, corrector) by constructing the pieces from the registries. The dataset name is checked
    when datasets.get_dataset builds it, which every mode does next, before anything is compiled.
    """
    for key, ok, what in _FIELD_CHECKS:
        _require(ok(_get(config, key)), f"config.{key} must be {what}, got {_get(config, key)}")
    n = config.training.n_jitted_steps
    for key in _JITTED_MULTIPLES:
        _require(_get(config, key) % n == 0, f"config.{key} = {_get(config, key)} must be a multiple of "
                                            f"config.training.n_jitted_steps = {n}")
    for key in ("training.batch_size", "eval.batch_size"):
        devices, hosts = jax.device_count(), jax.process_count()
        _require(_get(config, key) % devices == 0 and _get(config, key) % hosts == 0,
                 f"config.{key} = {_get(config, key)} must divide evenly over {devices} devices and {hosts} "
                 f"hosts; use a multiple of {devices}")
    _require(config.eval.batch_size <= config.eval.num_test, f"config.eval.batch_size = {config.eval.batch_size} "
             f"must not exceed config.eval.num_test = {config.eval.num_test}")
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
        self.rngs = _rng_streams(config.seed)
        init = functools.partial(losses.init_train_state, config=config, model=self.model,
                                 input_shape=(1,) + self.dataset.shape)
        self.initial_state = jax.jit(init, out_shardings=self.replicated)(self.rngs["init"])

    def score_fn(self, params):
        """The score function of `params` (a jax.tree_util.Partial: samplers trace the params, not retrace)."""
        return models.get_score_fn(self.sde, self.model, {"params": params}, train=False,
                                   continuous=self.config.training.continuous)


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
    save_scatter(os.path.join(directory, f"step_{step:08d}.png"), x, setup.dataset.test_data,
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
    """fn(state, step) -> held-out loss of the EMA parameters on the first eval.batch_size test points."""
    config = setup.config
    eval_fn = losses.get_eval_fn(losses.get_loss_fn(config, setup.sde, setup.model, train=False))
    batch = _array_from_global(setup.dataset.test_data[:config.eval.batch_size], _batch_sharding(setup.mesh, 1))
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
        return step % t.snapshot_freq == 0 or step == t.n_iters or step % t.snapshot_freq_for_preemption == 0

    def save(self, step, state):
        """Saves `state` at `step`; returns whether it was a permanent checkpoint."""
        t = self.training
        permanent = step % t.snapshot_freq == 0 or step == t.n_iters
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
    t = config.training
    checkpointer = _Checkpointer(workdir, config)
    try:
        state = _resume(setup, checkpointer, workdir)
        _save_config(config, workdir)
        _train_loop(setup, state, checkpointer, workdir)
    finally:
        checkpointer.close()  # waits for the async saves
    logging.info("training finished at step %d; checkpoints in %s", t.n_iters, workdir)


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
        return
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


# --- 7. Evaluation: test NLL by the probability-flow ODE, and the evaluators of evaluation.py. ---

def _batches(data, batch_size):
    return [data[i:i + batch_size] for i in range(0, len(data), batch_size)]


def _exact_divergence(config, dim):
    """config.eval.exact_divergence if set, else exact for D <= 16 (D Jacobian-vector products per evaluation)."""
    exact = config.eval.get("exact_divergence")
    return dim <= 16 if exact is None else bool(exact)


def test_nll(rng, config, sde, score_fn, batches):
    """-log p(x) [N] in nats of held-out batches by the probability-flow ODE (SPEC §4), and the mean NFE."""
    e = config.eval
    exact = _exact_divergence(config, int(np.prod(batches[0].shape[1:])))
    nll, nfe = [], []
    for i, x in enumerate(batches):
        logp, _, n = likelihood.log_likelihood(
            jax.random.fold_in(rng, i), sde, score_fn, jnp.asarray(x), exact_divergence=exact,
            hutchinson_type=e.get("hutchinson_type", "rademacher"), rtol=e.rtol, atol=e.atol, eps=e.eps,
            solver=e.get("solver", "tsit5"))
        nll.append(-np.asarray(logp, np.float64))
        nfe.append(float(n))
    return np.concatenate(nll), float(np.mean(nfe))


def _nll_scalars(nll, nfe, dataset):
    """Test NLL (mean, standard error), bits/dim where the data are discrete, and the true density's values."""
    scalars = {"test_nll": float(nll.mean()), "test_nll_se": float(nll.std(ddof=1) / np.sqrt(nll.size)),
               "nll_nfe": nfe}
    if dataset.levels is not None:
        bpd = likelihood.bits_per_dim(-nll, dataset.shape, dataset.data_range, dataset.levels)
        scalars["test_bpd"] = float(np.mean(bpd))
    if dataset.density is not None:
        true_nll = -np.asarray(dataset.density.log_prob(jnp.asarray(dataset.test_data)), np.float64)
        scalars["test_nll_true_density"] = float(true_nll.mean())
    return scalars


def _evaluators(config, sde):
    """evaluation.get_evaluators without its NLL evaluator: evaluate() computes the test NLL itself."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.eval.enable_bpd = False
    return evaluation.get_evaluators(config, sde)


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
    """Evaluates the checkpoints of `workdir` (see _eval_steps): the test NLL in nats on config.eval.num_test
    held-out points, plus config's evaluators; writes workdir/eval_folder/metrics.jsonl and TensorBoard."""
    validate_config(config)
    _require_checkpoints(workdir)
    eval_dir = ensure_writable(os.path.join(workdir, eval_folder))
    setup = Setup(config)
    managers = checkpoint_managers(workdir, config, create=False)
    batches = _batches(setup.dataset.test_data, config.eval.batch_size)
    entropy = None
    if setup.dataset.density is not None:
        entropy = setup.dataset.density.entropy(setup.rngs["entropy"])
    writer = MetricWriter(os.path.join(eval_dir, "metrics.jsonl"), eval_dir)
    try:
        for step, manager in _eval_steps(config, managers):
            _require(step is not None, f"no complete checkpoint in {workdir}; train first with --mode=train")
            state = restore(manager, step, setup.initial_state, workdir)
            scalars = _evaluate_state(setup, state, step, batches)
            if entropy is not None:
                scalars.update(entropy=float(entropy[0]), entropy_se=float(entropy[1]))
            writer.write(step, scalars)
            _log_eval(step, scalars)
    finally:
        writer.close()


def _evaluate_state(setup, state, step, batches):
    config, rng = setup.config, jax.random.fold_in(setup.rngs["eval"], step)
    score_fn = setup.score_fn(state.ema_params)
    scalars = {}
    if config.eval.get("enable_bpd", True):
        scalars.update(_nll_scalars(*test_nll(rng, config, setup.sde, score_fn, batches), setup.dataset))
    for i, run in enumerate(_evaluators(config, setup.sde)):
        scalars.update({name: float(v) for name, v in run(jax.random.fold_in(rng, i + 1), score_fn, batches)})
    return scalars


def _log_eval(step, scalars):
    if "test_nll" in scalars:
        truth = (f" (entropy of the true density {scalars['entropy']:.4f} ± {scalars['entropy_se']:.4f}; "
                 f"its NLL on these points {scalars['test_nll_true_density']:.4f})" if "entropy" in scalars else "")
        logging.info("step %d: test NLL = %.4f ± %.4f nats%s", step, scalars["test_nll"], scalars["test_nll_se"],
                     truth)
    logging.info("step %d: %s", step, json.dumps(scalars))


# --- 8. Sampling from the newest checkpoint. ---

def sample(config, workdir):
    """Draws config.sampling.num_samples samples from the newest checkpoint's EMA parameters into
    workdir/samples/samples_<step>.npz (samples, nfe, step) and a scatter plot samples_<step>.png."""
    validate_config(config)
    _require_checkpoints(workdir)
    directory = ensure_writable(os.path.join(workdir, "samples"))
    setup = Setup(config)
    state, step = restore_latest(workdir, config, setup)
    x, nfe = draw_samples(setup, state.ema_params, jax.random.fold_in(setup.rngs["sample"], step))
    path = os.path.join(directory, f"samples_{step:08d}")
    np.savez(path + ".npz", samples=x, nfe=nfe, step=step)
    save_scatter(path + ".png", x, setup.dataset.test_data,
                 f"{config.data.dataset}, step {step}, {config.sampling.method} ({nfe} NFE)")
    logging.info("saved %d samples (%d NFE) of the step-%d checkpoint to %s.npz/.png", len(x), nfe, step, path)
    return x
