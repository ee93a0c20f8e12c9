"""Convert a checkpoint of the score-SDE reference code (yang-song/score_sde, JAX/flax) into one of ours.

    python scripts/convert_score_sde_checkpoint.py --config=configs/ve/cifar10_ncsnpp_continuous.py \\
        --checkpoint=downloads/ve/cifar10_ncsnpp_continuous/checkpoint_26 --workdir=runs/ve_cifar10_ncsnpp_converted
    python main.py --config=configs/ve/cifar10_ncsnpp_continuous.py --workdir=runs/ve_cifar10_ncsnpp_converted \\
        --mode=sample

--config is our config of the same experiment (configs/ve, vp, subvp mirror the reference's configs; overrides
--config.<section>.<field>=value work as in main.py). The converted workdir holds config.json and one permanent
checkpoint; --mode=sample, --mode=eval and --mode=train (resuming) use it like one of their own.

What the reference writes (its run_lib.py, models/utils.py and losses.py):
- `flax.training.checkpoints.save_checkpoint(workdir/checkpoints, state, step=k // snapshot_freq)` after training
  step k: one msgpack file `checkpoint_<N>` holding `flax.serialization.to_state_dict(state)` of its flax.struct
  `State` (the released checkpoints are these files):
      step         int32 scalar, the number of updates applied
      optimizer    the flax.optim.Adam optimizer: {"target": params, "state": {"step": int32 scalar,
                   "param_states": the params tree with each array replaced by {"grad_ema", "grad_sq_ema"}}}
      lr           config.optim.lr (the step's rate is lr · min(step / warmup, 1))
      model_state  {} (the score-SDE networks have no variables besides "params")
      ema_rate     config.model.ema_rate
      params_ema   the params tree of the EMA weights (what the reference samples and evaluates with)
      rng          uint32 [2], its training key
- The parameter trees are named by flax.linen's automatic names inside the model class, `<ClassName>_<k>` per
  class in creation order: GaussianFourierProjection_0/W, Dense_0, Conv_0, ResnetBlockBigGANpp_<k>/{GroupNorm_0,
  Conv_0, Dense_0, GroupNorm_1, Conv_1, Conv_2}, AttnBlockpp_<k>/{GroupNorm_0, NIN_0..3}/{W, b},
  Downsample_<k>/Conv2d_0/{weight, bias} (FIR) or Conv_0, Combine_<k>/Conv_0, ... (NCSN++ / DDPM++ "ncsnpp");
  ResnetBlockDDPM_<k>, AttnBlock_<k>, Downsample_<k>, Upsample_<k> (DDPM "ddpm"); ResidualBlock_<k>,
  RefineBlock_<k>/{RCUBlock_<j>, MSFBlock_0, CRPBlock_0} with InstanceNorm2dPlus_<k>/{alpha, gamma, beta}
  (NCSNv2 "ncsnv2_64/128/256"). Our models create the same modules in the same order (models/ncsnpp.py, ddpm.py,
  ncsnv2.py), so for the same config our tree is the reference's, name for name and shape for shape.

The mapping into losses.TrainState is therefore the identity on every parameter tree, with the state restructured:
    params      <- optimizer.target
    ema_params  <- params_ema
    step        <- step
    opt_state   <- our optimizer's state (losses.get_optimizer) with its optax.ScaleByAdamState set to
                   (count = optimizer.state.step, mu = grad_ema, nu = grad_sq_ema) and its learning-rate schedule's
                   count to `step`. flax.optim.Adam and optax.scale_by_adam keep the same moments, bias-correct
                   with t = count + 1 and add eps outside the square root, and both codes clip the global gradient
                   norm and warm up the rate alike, so resumed training continues the reference's optimizer. (flax
                   decays weights decoupled, our "adam" coupled: a difference only when optim.weight_decay != 0,
                   and it is 0 in every score-SDE config.)
    dropped     lr and ema_rate (ours come from config.optim.lr and config.model.ema_rate; a difference is
                reported), rng (our keys derive from config.seed), model_state (must be empty).
Every array's path and shape is checked against our model of --config before anything is written.

The checkpoint goes to workdir/checkpoints/<N · config.training.snapshot_freq> for a file named checkpoint_<N>,
the reference's numbering, so eval.begin_ckpt..end_ckpt select it in --mode=eval as they did in the reference.
The state's own step is kept (the reference saves checkpoint_<N> after the compiled call that starts at step
N · snapshot_freq, so its State.step is that plus n_jitted_steps). Any other file name goes to the state's step;
a file from the reference's checkpoints-meta/ is numbered by snapshot_freq_for_preemption: rename it to place it
at its own step.
"""
import functools
import os
import re
import sys

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402
import models  # noqa: E402
import run_lib  # noqa: E402

# The reference State's fields that the conversion needs (lr and ema_rate are only compared, rng is unused).
_REQUIRED = {"": ("step", "optimizer", "params_ema", "model_state"), "optimizer": ("target", "state"),
             "optimizer.state": ("step", "param_states")}
_MOMENTS = ("grad_ema", "grad_sq_ema")   # flax.optim.Adam's per-parameter state
_SHOWN = 8                                # paths listed per kind of mismatch


# --- Reading the reference's file. ---

def read_reference_checkpoint(path):
    """The reference State's state dict (nested dicts of numpy arrays) from its msgpack file checkpoint_<N>."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint file {path}; pass --checkpoint=<the reference's checkpoint_<N> file>")
    with open(path, "rb") as f:
        data = f.read()
    try:
        state = flax.serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types for foreign bytes
        raise ValueError(f"{path} is not a flax msgpack checkpoint ({type(e).__name__}: {e}); pass the "
                         "reference's checkpoint_<N> file") from None
    check_reference_layout(state, path)
    return state


def check_reference_layout(state, source="the checkpoint"):
    """ValueError unless `state` has the reference State's fields (see the module docstring)."""
    for where, fields in _REQUIRED.items():
        node = state
        for key in filter(None, where.split(".")):
            node = node[key]
        if not isinstance(node, dict) or any(field not in node for field in fields):
            found = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise ValueError(f"{source} is not a score-SDE State: {where or 'the top level'} needs the fields "
                             f"{list(fields)}, found {found}")
    if jax.tree.leaves(state["model_state"]):
        raise ValueError(f"{source} has model variables besides the parameters (model_state: "
                         f"{sorted(_flat(state['model_state']))[:_SHOWN]}); the score-SDE networks have none")


# --- Checking and converting parameter trees. ---

def _flat(tree, prefix=""):
    """{"Conv_0/kernel": leaf, ...} of a nested dict."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def _template_paths(template):
    """The template tree's paths (in its leaf order), leaves and treedef."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    paths = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in with_paths]
    return paths, [leaf for _, leaf in with_paths], treedef


def _listing(kind, items):
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"\n  {kind} ({len(items)}): " + ", ".join(items[:_SHOWN]) + more


def tree_like(found, template, name):
    """The arrays of `found` ({path: array}, see _flat) as a tree of template's structure and dtypes.

    ValueError listing the paths missing from the checkpoint, the unexpected ones and the mis-shaped ones when the
    two differ in any path or shape; `name` says which part of the checkpoint it is.
    """
    paths, leaves, treedef = _template_paths(template)
    expected = dict(zip(paths, leaves))
    missing = [p for p in paths if p not in found]
    unexpected = sorted(p for p in found if p not in expected)
    misshaped = [f"{p} {tuple(np.shape(found[p]))} in the checkpoint, {tuple(expected[p].shape)} in the model"
                 for p in paths if p in found and tuple(np.shape(found[p])) != tuple(expected[p].shape)]
    if missing or unexpected or misshaped:
        raise ValueError(f"the checkpoint's {name} does not match the model of this config:"
                         + (_listing("missing from the checkpoint", missing) if missing else "")
                         + (_listing("unexpected in the checkpoint", unexpected) if unexpected else "")
                         + (_listing("mis-shaped", misshaped) if misshaped else "")
                         + "\nPass the --config that the checkpoint was trained with.")
    arrays = [jnp.asarray(found[p], dtype=leaf.dtype) for p, leaf in zip(paths, leaves)]
    return jax.tree_util.tree_unflatten(treedef, arrays)


def _moments(param_states, template):
    """(grad_ema, grad_sq_ema) trees from flax.optim.Adam's param_states, each shaped like `template`."""
    split = {moment: {} for moment in _MOMENTS}
    for path, leaf in _flat(param_states).items():
        head, _, moment = path.rpartition("/")
        if moment not in split:
            raise ValueError(f"optimizer.state.param_states/{path} is not a flax.optim.Adam state (expected "
                             f"<parameter path>/{' or '.join(_MOMENTS)})")
        split[moment][head] = leaf
    return tuple(tree_like(split[m], template, f"optimizer.state.param_states (Adam's {m})") for m in _MOMENTS)


# --- The optimizer state. ---

def _is_adam_or_schedule(node):
    return isinstance(node, (optax.ScaleByAdamState, optax.ScaleByScheduleState))


def optimizer_state(template_opt_state, adam_state, step):
    """The template's optax state with its ScaleByAdamState replaced by `adam_state` and its learning-rate
    schedule's count set to `step`; ValueError when it has no Adam state or parts the reference cannot fill."""
    adams = [n for n in jax.tree.leaves(template_opt_state, is_leaf=_is_adam_or_schedule)
             if isinstance(n, optax.ScaleByAdamState)]
    if len(adams) != 1:
        raise ValueError(f"the reference trains with Adam, but config.optim's optimizer state has {len(adams)} Adam "
                         "states; use config.optim.optimizer = 'adam'")

    def convert(node):
        if isinstance(node, optax.ScaleByAdamState):
            return adam_state
        if isinstance(node, optax.ScaleByScheduleState):
            return optax.ScaleByScheduleState(count=jnp.asarray(step, jnp.int32))
        raise ValueError(f"config.optim's optimizer state has a part ({node}) that the reference's Adam state "
                         "does not provide; use config.optim.optimizer = 'adam'")

    return jax.tree.map(convert, template_opt_state, is_leaf=_is_adam_or_schedule)


# --- The conversion. ---

def train_state_template(config):
    """The TrainState that run_lib.Setup builds for `config`, as jax.ShapeDtypeStruct leaves (nothing computed)."""
    d = config.data
    init = functools.partial(losses.init_train_state, config=config, model=models.create_model(config),
                             input_shape=(1, d.image_size, d.image_size, d.num_channels))
    return jax.eval_shape(init, jax.random.PRNGKey(0))


def convert_state(reference_state, template):
    """losses.TrainState from the reference State's state dict (mapping in the module docstring).

    template: the TrainState of our config (arrays or jax.ShapeDtypeStruct leaves, e.g. train_state_template):
    only its structure, shapes and dtypes are used. Raises ValueError when the checkpoint's trees differ from it.
    """
    check_reference_layout(reference_state)
    optimizer = reference_state["optimizer"]
    params = tree_like(_flat(optimizer["target"]), template.params, "optimizer.target")
    ema_params = tree_like(_flat(reference_state["params_ema"]), template.params, "params_ema")
    mu, nu = _moments(optimizer["state"]["param_states"], template.params)
    adam = optax.ScaleByAdamState(count=jnp.asarray(np.asarray(optimizer["state"]["step"]), jnp.int32), mu=mu, nu=nu)
    step = int(np.asarray(reference_state["step"]))
    return losses.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                             opt_state=optimizer_state(template.opt_state, adam, step), ema_params=ema_params)


def hyperparameter_notes(reference_state, config):
    """Lines on the reference's lr / ema_rate where they differ from the config's (which a resumed run uses)."""
    pairs = (("lr", "optim.lr", config.optim.lr), ("ema_rate", "model.ema_rate", config.model.ema_rate))
    return [f"the checkpoint was trained with {field} = {float(np.asarray(reference_state[field])):g}, "
            f"config.{key} is {ours:g} (used if you resume training)"
            for field, key, ours in pairs
            if field in reference_state and not np.isclose(float(np.asarray(reference_state[field])), ours)]


def directory_step(checkpoint_path, config, step):
    """N · config.training.snapshot_freq for the reference's file checkpoint_<N>, else `step`."""
    match = re.fullmatch(r"checkpoint_(\d+)", os.path.basename(os.path.normpath(checkpoint_path)))
    return int(match.group(1)) * config.training.snapshot_freq if match else step


def save_converted(state, config, workdir, step):
    """Writes `state` as the permanent checkpoint `step` of workdir (run_lib's layout) and workdir/config.json."""
    run_lib.ensure_writable(workdir)
    permanent, meta = run_lib.checkpoint_managers(workdir, config)
    try:
        existing = sorted(set(permanent.all_steps()) | set(meta.all_steps()))
        if existing:
            raise ValueError(f"{workdir} already holds checkpoints (steps {existing}); convert into a new --workdir")
        permanent.save(step, args=ocp.args.StandardSave(state))
        permanent.wait_until_finished()
    finally:
        permanent.close()
        meta.close()
    run_lib._save_config(config, workdir)


def convert(config, checkpoint_path, workdir):
    """Reads, checks, converts and saves one reference checkpoint; returns (the checkpoint's step in workdir,
    the converted TrainState)."""
    reference = read_reference_checkpoint(checkpoint_path)
    state = convert_state(reference, train_state_template(config))
    for note in hyperparameter_notes(reference, config):
        logging.warning(note)
    step = directory_step(checkpoint_path, config, int(state.step))
    save_converted(state, config, workdir, step)
    return step, state


# --- Command line. ---

FLAGS = flags.FLAGS


def _define_flags():
    """Defined only when run as a script, so importing this module (the tests) leaves absl's flags alone."""
    config_flags.DEFINE_config_file("config", None, "Our config file of the checkpoint's experiment.",
                                    lock_config=True)
    flags.DEFINE_string("checkpoint", None, "The reference's checkpoint file (checkpoint_<N>, msgpack).")
    flags.DEFINE_string("workdir", None, "New working directory for the converted checkpoint.")
    flags.mark_flags_as_required(["config", "checkpoint", "workdir"])


def _not_orbax(record):
    """Keeps orbax's INFO chatter off the console, as main.py does (its warnings and errors still show)."""
    return record.levelno >= logging.converter.STANDARD_WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; flags are written --name=value")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_not_orbax)
    try:
        step, state = convert(FLAGS.config, FLAGS.checkpoint, FLAGS.workdir)
    except ValueError as e:
        sys.exit(f"error: {e}")
    logging.info("converted %s (trained %d steps) into %s", FLAGS.checkpoint, int(state.step),
                 os.path.join(FLAGS.workdir, "checkpoints", str(step)))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
