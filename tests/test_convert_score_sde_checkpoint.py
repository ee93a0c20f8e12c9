"""Tests of scripts/convert_score_sde_checkpoint.py: a checkpoint in the score-SDE reference layout (the state dict
of its flax.struct State, written with flax.serialization.msgpack_serialize to a file named like the reference's,
checkpoint_26) becomes a TrainState of ours that gives the same network outputs, carries the step and continues
flax.optim.Adam's update (to float32 rounding); mismatched trees and foreign files give errors that list what is wrong.

The reference states are built here from our models' parameter trees (the converter's docstring gives the
reference's layout and why its trees are ours), on smoke-sized configs (configs.smoke) of NCSN++ (VE), DDPM++ (VP)
and DDPM, with random values: every array differs from every other, so a swapped tree would show.
"""
import copy
import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs
import losses
import models
import run_lib
import sde_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_score_sde_checkpoint.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_score_sde_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cv = _load_script()

CONFIGS = {
    "ve_ncsnpp_continuous": "configs.ve.cifar10_ncsnpp_continuous",
    "vp_ddpmpp_continuous": "configs.vp.cifar10_ddpmpp_continuous",
    "vp_ddpm": "configs.vp.ddpm.cifar10",
}
STEP, ADAM_STEP = 53, 53   # checkpoint_26 at smoke's snapshot_freq 2: step 52 plus the last call's one step


def smoke_config(name):
    return configs.smoke(importlib.import_module(CONFIGS[name]).get_config())


def random_tree(template, seed, scale=0.1, positive=False):
    """numpy float32 arrays of the template's shapes, N(0, scale²) (|.| if positive)."""
    rng = np.random.default_rng(seed)
    draw = lambda s: scale * rng.normal(size=s.shape)  # noqa: E731
    return jax.tree.map(lambda s: (np.abs(draw(s)) if positive else draw(s)).astype(np.float32), template)


def reference_state(params, ema, grad_ema, grad_sq_ema, step=STEP, adam_step=ADAM_STEP, lr=2e-4, ema_rate=0.999):
    """`flax.serialization.to_state_dict` of the reference's State (models/utils.py) holding these trees."""
    param_states = jax.tree.map(lambda m, v: {"grad_ema": m, "grad_sq_ema": v}, grad_ema, grad_sq_ema)
    return {"step": np.asarray(step, np.int32),
            "optimizer": {"target": params,
                          "state": {"step": np.asarray(adam_step, np.int32), "param_states": param_states}},
            "lr": np.float32(lr), "model_state": {}, "ema_rate": np.float32(ema_rate), "params_ema": ema,
            "rng": np.asarray([0, 42], np.uint32)}


def write_checkpoint(state, directory, name="checkpoint_26"):
    path = pathlib.Path(directory) / name
    path.write_bytes(flax.serialization.msgpack_serialize(state))
    return str(path)


class Case:
    """One config's template, random source trees, their reference-layout file and its conversion."""

    def __init__(self, name, directory):
        self.config = smoke_config(name)
        self.template = cv.train_state_template(self.config)
        p = self.template.params
        self.params, self.ema = random_tree(p, 1), random_tree(p, 2)
        self.mu, self.nu = random_tree(p, 3, scale=0.01), random_tree(p, 4, scale=1e-4, positive=True)
        self.reference = reference_state(self.params, self.ema, self.mu, self.nu)
        self.path = write_checkpoint(self.reference, directory)
        self.converted = cv.convert_state(cv.read_reference_checkpoint(self.path), self.template)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp(request.param))


def assert_trees_equal(tree, expected):
    assert jax.tree.structure(tree) == jax.tree.structure(jax.tree.map(jnp.asarray, expected))
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), b)   # exact: conversion only moves the arrays


def fixed_input(config, seed=0):
    """Two images and the noise labels of t = 0.3, 0.8 as the config's SDE gives them to the network."""
    d = config.data
    x = np.random.default_rng(seed).uniform(size=(2, d.image_size, d.image_size, d.num_channels))
    labels = sde_lib.get_sde(config).noise_labels(jnp.asarray([0.3, 0.8]), config.training.continuous)
    return jnp.asarray(x, jnp.float32), labels


# --- The conversion of the reference layout. ---

def test_converted_parameters_give_the_source_outputs_exactly(case):
    apply = jax.jit(models.create_model(case.config).apply)
    x, labels = fixed_input(case.config)
    out = {name: np.asarray(apply({"params": jax.tree.map(jnp.asarray, tree)}, x, labels))
           for name, tree in (("ema", case.ema), ("params", case.params))}
    # Exact: the same float32 arrays through the same compiled function.
    np.testing.assert_array_equal(apply({"params": case.converted.ema_params}, x, labels), out["ema"])
    np.testing.assert_array_equal(apply({"params": case.converted.params}, x, labels), out["params"])
    # The two source trees give different outputs, so a swap of params_ema and optimizer.target would show.
    assert np.max(np.abs(out["ema"] - out["params"])) > 1e-3 * np.max(np.abs(out["ema"]))
    assert_trees_equal(case.converted.ema_params, case.ema)
    assert_trees_equal(case.converted.params, case.params)


def test_step_and_adam_moments_are_carried_over(case):
    state = case.converted
    assert int(state.step) == STEP
    adam = [n for n in jax.tree.leaves(state.opt_state, is_leaf=cv._is_adam_or_schedule)
            if isinstance(n, optax.ScaleByAdamState)]
    schedule = [n for n in jax.tree.leaves(state.opt_state, is_leaf=cv._is_adam_or_schedule)
                if isinstance(n, optax.ScaleByScheduleState)]
    assert len(adam) == 1 and len(schedule) == 1
    assert int(adam[0].count) == ADAM_STEP and int(schedule[0].count) == STEP
    assert_trees_equal(adam[0].mu, case.mu)
    assert_trees_equal(adam[0].nu, case.nu)
    # The optax state structure of a fresh run's (the template's), so run_lib restores it into its own template.
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(case.template.opt_state)


def flax_adam_update(params, grads, mu, nu, step, adam_step, config):
    """One update of the reference (losses.optimization_manager + flax.optim.Adam), in float64 numpy:
    clip the global norm, lr · min(step / warmup, 1), moments, bias correction with t = adam_step + 1."""
    o = config.optim
    leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    norm = np.sqrt(sum(np.sum(g**2) for g in leaves))
    clipped = [g * o.grad_clip / max(norm, o.grad_clip) for g in leaves]
    lr = o.lr * min(step / o.warmup, 1.0)
    t = adam_step + 1
    b1, b2 = o.beta1, 0.999
    m = [b1 * np.asarray(a, np.float64) + (1 - b1) * g for a, g in zip(jax.tree.leaves(mu), clipped)]
    v = [b2 * np.asarray(a, np.float64) + (1 - b2) * g**2 for a, g in zip(jax.tree.leaves(nu), clipped)]
    delta = [-lr * (mi / (1 - b1**t)) / (np.sqrt(vi / (1 - b2**t)) + o.eps) for mi, vi in zip(m, v)]
    return delta, m, v


def test_adam_update_continues_the_reference_optimizer():
    # The mapping does not depend on the network, so a three-array tree keeps the update uncompiled and cheap.
    # Step 3 of the warm-up: bias correction (1 - 0.9^4 vs 0.9^5: 19 %) and the warm-up rate (3 vs 4 / 5000:
    # 33 %) make an off-by-one count visible; gradients of global norm ≈ 6 exercise the clipping to 1.
    config = smoke_config("ve_ncsnpp_continuous")
    shapes = {"Conv_0": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "Dense_0": {"kernel": (5, 4)}}
    template_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                                   is_leaf=lambda s: isinstance(s, tuple))
    params = random_tree(template_params, 1)
    template = losses.TrainState(step=jnp.zeros((), jnp.int32), params=template_params,
                                 opt_state=jax.eval_shape(losses.get_optimizer(config).init, template_params),
                                 ema_params=template_params)
    mu, nu = random_tree(template_params, 3, scale=0.01), random_tree(template_params, 4, scale=1e-4, positive=True)
    step = 3
    state = cv.convert_state(reference_state(params, params, mu, nu, step=step, adam_step=step), template)
    grads = jax.tree.map(jnp.asarray, random_tree(template_params, 5, scale=1.0))
    updates, opt_state = jax.jit(losses.get_optimizer(config).update)(grads, state.opt_state, state.params)
    delta, m, v = flax_adam_update(params, grads, mu, nu, step, step, config)
    adam = [n for n in jax.tree.leaves(opt_state, is_leaf=cv._is_adam_or_schedule)
            if isinstance(n, optax.ScaleByAdamState)][0]
    # float32 against float64: a few ulps per operation (relative 1e-6), except where the two terms of a moment
    # update cancel; so rtol 1e-5 plus an absolute 1e-6 of the largest value of each array.
    for ours, theirs in ((updates, delta), (adam.mu, m), (adam.nu, v)):
        for a, b in zip(jax.tree.leaves(ours), theirs):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6 * np.max(np.abs(b)))
    # The check has power: the update one Adam step later differs by far more than the tolerance.
    later, _, _ = flax_adam_update(params, grads, mu, nu, step + 1, step + 1, config)
    assert np.max(np.abs(later[0] - delta[0])) > 0.1 * np.max(np.abs(delta[0]))


# --- Errors. ---

def _edited(reference, edit):
    state = copy.deepcopy(reference)
    edit(state)
    return state


def test_mismatched_trees_raise_errors_that_list_the_paths(case):
    ref, template = case.reference, case.template

    def drop(s):
        del s["params_ema"]["Conv_0"]["bias"]

    def reshape(s):
        s["optimizer"]["target"]["Dense_0"]["kernel"] = np.zeros((3, 5), np.float32)

    def add(s):
        s["optimizer"]["state"]["param_states"]["Extra_0"] = {"W": {"grad_ema": np.zeros(2), "grad_sq_ema": 0.0}}

    expected_messages = [
        (drop, r"params_ema does not match .*\n  missing from the checkpoint \(1\): Conv_0/bias\n"),
        (reshape, r"optimizer.target does not match .*\n  mis-shaped \(1\): Dense_0/kernel \(3, 5\) in the checkpoint, "
                  r"\(\d+, \d+\) in the model\n"),
        (add, r"param_states \(Adam's grad_ema\) does not match .*\n  unexpected in the checkpoint \(1\): Extra_0/W\n"),
    ]
    for edit, message in expected_messages:
        with pytest.raises(ValueError, match=message):
            cv.convert_state(_edited(ref, edit), template)


def test_a_checkpoint_of_another_config_lists_some_paths_and_counts_the_rest(case):
    other = "vp_ddpm" if case.config.model.name != "ddpm" else "ve_ncsnpp_continuous"
    with pytest.raises(ValueError, match=r"(missing|mis-shaped).*\(\d+\): .* and \d+ more") as error:
        cv.convert_state(case.reference, cv.train_state_template(smoke_config(other)))
    assert "Pass the --config that the checkpoint was trained with" in str(error.value)


def test_files_that_are_not_reference_checkpoints_raise(tmp_path, case):
    garbage = tmp_path / "checkpoint_1"
    garbage.write_bytes(b"\xc1 not msgpack")
    bad = [
        (str(tmp_path / "checkpoint_404"), r"no checkpoint file"),
        (str(garbage), r"is not a flax msgpack checkpoint"),
        (write_checkpoint({"params": case.params}, tmp_path, "checkpoint_2"),
         r"not a score-SDE State: the top level needs the fields \['step', 'optimizer', 'params_ema'"),
        (write_checkpoint(_edited(case.reference, lambda s: s["optimizer"].pop("state")), tmp_path, "checkpoint_3"),
         r"optimizer needs the fields \['target', 'state'\]"),
        (write_checkpoint(_edited(case.reference, lambda s: s.update(model_state={"batch_stats": case.ema})),
                          tmp_path, "checkpoint_4"), r"model variables besides the parameters"),
    ]
    for path, message in bad:
        with pytest.raises(ValueError, match=message):
            cv.read_reference_checkpoint(path)


def test_directory_step_follows_the_reference_numbering():
    config = smoke_config("ve_ncsnpp_continuous")
    # checkpoint_<N> was written after step N · snapshot_freq (+ the last call's steps); other names keep the step.
    assert cv.directory_step("/x/checkpoints/checkpoint_26", config, 53) == 26 * config.training.snapshot_freq
    assert cv.directory_step("/x/my_checkpoint.msgpack", config, 53) == 53


def test_hyperparameter_notes_name_the_differing_fields():
    config = smoke_config("ve_ncsnpp_continuous")   # lr 2e-4, ema_rate 0.999
    same = reference_state({}, {}, {}, {}, lr=2e-4, ema_rate=0.999)
    assert cv.hyperparameter_notes(same, config) == []
    notes = cv.hyperparameter_notes(reference_state({}, {}, {}, {}, lr=1e-4, ema_rate=0.9999), config)
    assert len(notes) == 2 and "lr = 0.0001" in notes[0] and "ema_rate = 0.9999" in notes[1]


# --- The command line, and run_lib restoring the result like one of its own checkpoints. ---

SMOKE_CONFIG = """
from configs import smoke
from configs.ve import cifar10_ncsnpp_continuous


def get_config():
    return smoke(cifar10_ncsnpp_continuous.get_config())
"""


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_command_line_conversion_is_restored_by_run_lib(tmp_path):
    config_file = tmp_path / "smoke_config.py"
    config_file.write_text(SMOKE_CONFIG)
    c = Case("ve_ncsnpp_continuous", tmp_path)
    workdir = tmp_path / "converted"
    args = (f"--config={config_file}", f"--checkpoint={c.path}", f"--workdir={workdir}")
    result = run_script(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    step = 26 * c.config.training.snapshot_freq
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(step)]
    assert json.loads((workdir / "config.json").read_text()) == json.loads(c.config.to_json())
    # What --mode=sample and --mode=eval do: restore the newest checkpoint into run_lib.Setup's initial state
    # (zeros of the same tree here: Setup would also compile the model's initializers, ~40 s).
    setup = types.SimpleNamespace(initial_state=jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), c.template))
    state, restored_step = run_lib.restore_latest(str(workdir), c.config, setup)
    assert restored_step == step and int(state.step) == STEP
    assert_trees_equal(state.ema_params, c.ema)
    assert_trees_equal(state.params, c.params)
    assert_trees_equal(state.opt_state, jax.tree.map(np.asarray, c.converted.opt_state))
    # A second conversion into the same workdir is refused and changes nothing.
    with pytest.raises(ValueError, match=rf"already holds checkpoints \(steps \[{step}\]\); convert into a new"):
        cv.save_converted(c.converted, c.config, str(workdir), step + 2)
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(step)]
