"""Tests of models/inception.py: the torch-free reader of torch state dicts, the name mapping onto the flax tree,
the FID Inception network and its input preprocessing.

Ground truth without torch at test time:
- tests/data/torch_small_{zip,legacy}.pth were written by real torch 2.13 (`torch.save`, both serialization
  formats) from tensors with storage offsets, non-contiguous strides, a shared storage, a 0-d tensor and six
  dtypes: a = arange(24) as [2, 3, 4]; b = its [4, 6] view [:, 1:4]; c = its elements 5..10 as [2, 3];
  d = arange(6, int64) as [3, 2], transposed; e = [True, False]; f = arange(5, float64) / 4; g = 3.5;
  h = arange(4, float16).
- tests/data/fid_inception_torch_outputs.npz holds pool_3 and logits that a torch re-implementation of
  pytorch-fid's FID Inception (F.interpolate to 299x299, 2x - 1, the FIDInceptionA/C/E blocks) computed for the
  weights and images of `_formula_value` / `_formula_images` below (a splitmix64 hash of (tensor name, index):
  the same numbers on every machine without a random generator). The test writes those weights under the torch
  names into a torch-format file with the writer below, loads them through the reader and the name mapping, and
  runs the flax network: a wrong name, transpose, pool or block would change the outputs.
The writers below emit torch's two file formats from their description (pickle opcodes by hand, no torch).
"""
import collections
import io
import os
import pathlib
import pickle
import struct
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from models import inception

DATA = pathlib.Path(__file__).resolve().parent / "data"


# --- Writers of the two torch formats (a dict of numpy arrays; contiguous, one storage per tensor). ---

_STORAGE_NAMES = {np.dtype(d): name for name, d in inception._STORAGE_DTYPES.items()}


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _str(s):
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(i):
    return b"J" + struct.pack("<i", i)


def _ints(values):
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def _tensor_pickle(key, array, legacy):
    strides = [s // array.itemsize for s in array.strides]
    pid = (b"(" + _str("storage") + _global("torch", _STORAGE_NAMES[array.dtype]) + _str(key) + _str("cpu")
           + _int(array.size) + (b"N" if legacy else b"") + b"tQ")
    hooks = _global("collections", "OrderedDict") + b")R"
    return (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + _int(0) + _ints(array.shape)
            + _ints(strides) + b"\x89" + hooks + b"tR")


def _state_dict_pickle(state_dict, legacy):
    """Protocol-2 pickle of OrderedDict(name -> _rebuild_tensor_v2(storage pid, 0, shape, stride, False, hooks))."""
    items = b"".join(_str(name) + _tensor_pickle(str(i), a, legacy) for i, (name, a) in enumerate(state_dict.items()))
    return b"\x80\x02" + _global("collections", "OrderedDict") + b")R(" + items + b"u."


def write_torch_zip(path, state_dict):
    state_dict = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", _state_dict_pickle(state_dict, legacy=False))
        archive.writestr("archive/byteorder", "little")
        for i, array in enumerate(state_dict.values()):
            archive.writestr(f"archive/data/{i}", array.astype(array.dtype.newbyteorder("<")).tobytes())
        archive.writestr("archive/version", "3\n")


def write_torch_legacy(path, state_dict):
    state_dict = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as f:
        for header in (inception._LEGACY_MAGIC, 1001, info):
            f.write(pickle.dumps(header, protocol=2))
        f.write(_state_dict_pickle(state_dict, legacy=True))
        f.write(pickle.dumps([str(i) for i in range(len(state_dict))], protocol=2))
        for array in state_dict.values():
            f.write(struct.pack("<q", array.size) + array.astype(array.dtype.newbyteorder("<")).tobytes())


WRITERS = {"zip": write_torch_zip, "legacy": write_torch_legacy}


# --- The torch names and shapes of the FID Inception, and reproducible weights for them. ---

_FLAX_TO_TORCH = {("conv", "kernel"): ("weight", lambda s: (s[3], s[2], s[0], s[1])),
                  ("bn", "scale"): ("weight", tuple), ("bn", "bias"): ("bias", tuple),
                  ("bn", "mean"): ("running_mean", tuple), ("bn", "var"): ("running_var", tuple),
                  ("fc", "kernel"): ("weight", lambda s: (s[1], s[0])), ("fc", "bias"): ("bias", tuple)}


def torch_shapes():
    """{torch name: torch shape} of pytorch-fid's state dict, written from the flax tree (the inverse mapping)."""
    shapes = {}
    for (collection, *path), shape in inception.variable_shapes().items():
        leaf, convert = _FLAX_TO_TORCH[(path[-2], path[-1])]
        shapes[".".join(path[:-1] + [leaf])] = convert(shape)
    return shapes


def _hashed_uniform(n, seed):
    """n numbers in [0, 1) from splitmix64 of (seed, index): exact integer arithmetic, the same everywhere."""
    z = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _formula_value(name, shape):
    """Weights with O(1) activations: He-uniform convolutions, BN scale in [0.5, 1.5], var in [0.5, 2], ..."""
    u = _hashed_uniform(int(np.prod(shape)), zlib.crc32(name.encode())).reshape(shape)
    span = lambda lo, hi: lo + (hi - lo) * u
    parent, leaf = name.split(".")[-2:]
    if parent == "conv":
        return span(-1, 1) * np.sqrt(6.0 / np.prod(shape[1:]))
    if parent == "fc":
        return span(-1, 1) * np.sqrt(3.0 / 2048) if leaf == "weight" else span(-0.1, 0.1)
    return {"weight": span(0.5, 1.5), "bias": span(-0.1, 0.1), "running_mean": span(-0.1, 0.1),
            "running_var": span(0.5, 2.0)}[leaf]


def _formula_images():
    return _hashed_uniform(2 * 32 * 32 * 3, 12345).reshape(2, 32, 32, 3).astype(np.float32)


@pytest.fixture(scope="module")
def formula_state_dict():
    return {name: _formula_value(name, shape).astype(np.float32) for name, shape in torch_shapes().items()}


@pytest.fixture(scope="module")
def formula_variables(formula_state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "formula.pth"
    write_torch_legacy(path, formula_state_dict)
    return inception.load_fid_inception(path, sha256=None)


# --- The reader. ---

EXPECTED_SMALL = {
    "a": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    "b": np.arange(24, dtype=np.float32).reshape(4, 6)[:, 1:4],
    "c": np.arange(5, 11, dtype=np.float32).reshape(2, 3),
    "d": np.arange(6, dtype=np.int64).reshape(3, 2).T,
    "e": np.array([True, False]),
    "f": np.arange(5, dtype=np.float64) / 4,
    "g": np.array(3.5, np.float32),
    "h": np.arange(4, dtype=np.float16),
}


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_reader_reads_files_written_by_torch(fmt):
    """Exact values, dtypes and shapes of real torch files (offsets, strides, shared storage, 0-d, 6 dtypes)."""
    state = inception.load_torch_state_dict(DATA / f"torch_small_{fmt}.pth")
    assert list(state) == list(EXPECTED_SMALL)
    for name, expected in EXPECTED_SMALL.items():
        assert state[name].dtype == expected.dtype and state[name].shape == expected.shape, name
        np.testing.assert_array_equal(state[name], expected, err_msg=name)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_writer_round_trip(fmt, tmp_path):
    """Our writers produce what the reader (checked on torch's own files above) reads back bit for bit."""
    rng = np.random.default_rng(0)
    state = {"x.conv.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
             "y": rng.integers(-5, 5, (7,)), "z": rng.standard_normal(()).astype(np.float64)}
    WRITERS[fmt](tmp_path / "w.pth", state)
    back = inception.load_torch_state_dict(tmp_path / "w.pth")
    assert list(back) == list(state)
    for name in state:
        assert back[name].dtype == state[name].dtype
        np.testing.assert_array_equal(back[name], state[name])


def test_every_variable_lands_with_its_shape(tmp_path):
    """Random weights in the torch zip format (with the num_batches_tracked buffers torch adds) fill each of the
    472 flax leaves (284 params, 188 batch stats) once, transposed where the layouts differ."""
    shapes = torch_shapes()
    rng = np.random.default_rng(1)
    state = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    state.update({n.rsplit(".", 1)[0] + ".num_batches_tracked": np.array(7) for n in shapes if "running_var" in n})
    write_torch_zip(tmp_path / "random.pth", state)
    variables = inception.load_fid_inception(tmp_path / "random.pth", sha256=None)
    flat = traverse_util.flatten_dict(variables)
    expected = inception.variable_shapes()
    assert {p: v.shape for p, v in flat.items()} == expected
    assert sum(p[0] == "params" for p in flat) == 284 and sum(p[0] == "batch_stats" for p in flat) == 188
    conv = state["Mixed_6b.branch7x7_2.conv.weight"]    # [O, I, 1, 7] -> [1, 7, I, O]
    np.testing.assert_array_equal(flat[("params", "Mixed_6b", "branch7x7_2", "conv", "kernel")],
                                  conv.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat[("params", "fc", "kernel")], state["fc.weight"].T)
    np.testing.assert_array_equal(flat[("batch_stats", "Mixed_7c", "branch_pool", "bn", "var")],
                                  state["Mixed_7c.branch_pool.bn.running_var"])


# --- Errors a user can cause. ---

def test_missing_or_wrong_file_says_where_to_download(tmp_path):
    with pytest.raises(ValueError, match="not found.*pytorch-fid/releases/download/fid_weights"):
        inception.load_fid_inception(tmp_path / "absent.pth")
    (tmp_path / "other.pth").write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="SHA-256 [0-9a-f]{64}, not 6726825d0af5.*fid_weights"):
        inception.load_fid_inception(tmp_path / "other.pth")


def test_foreign_files_are_rejected(tmp_path):
    (tmp_path / "plain.zip").write_bytes(_zip_bytes({"readme.txt": b"hi"}))
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        inception.load_torch_state_dict(tmp_path / "plain.zip")
    # A pickle that would call os.system under a plain unpickler: refused, nothing runs.
    evil = b"\x80\x02cos\nsystem\n" + _str("touch " + str(tmp_path / "pwned")) + b"\x85R."
    (tmp_path / "evil.pth").write_bytes(_zip_bytes({"archive/data.pkl": evil}))
    with pytest.raises(ValueError, match="os.system is not part of a state dict"):
        inception.load_torch_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    # A tensor whose strides run outside its storage: refused before any memory is read.
    state = {"w": np.arange(6, dtype=np.float32)}
    write_torch_zip(tmp_path / "strided.pth", state)
    with zipfile.ZipFile(tmp_path / "strided.pth") as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    files["archive/data.pkl"] = files["archive/data.pkl"].replace(_ints([6]) + _ints([1]), _ints([6]) + _ints([2]))
    (tmp_path / "strided.pth").write_bytes(_zip_bytes(files))
    with pytest.raises(ValueError, match="reaches element 11 of a storage of 6"):
        inception.load_torch_state_dict(tmp_path / "strided.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable torch state dict"):
        inception.load_torch_state_dict(tmp_path / "garbage.pth")


def _zip_bytes(files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_wrong_state_dict_lists_what_is_wrong():
    shapes = torch_shapes()
    state = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    del state["Mixed_5b.branch1x1.bn.running_mean"]
    state["fc.weight"] = np.zeros((1000, 2048), np.float32)      # torchvision's 1000 classes
    state["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    with pytest.raises(ValueError, match=r"1 unexpected names: AuxLogits.fc.weight; 1 wrong shapes: params/fc/kernel"
                                         r" \(2048, 1000\) \(expected \(2048, 1008\)\); 1 missing variables: "
                                         r"batch_stats/Mixed_5b/branch1x1/bn/mean"):
        inception.variables_from_state_dict(state)


def test_unknown_preprocessing_is_a_value_error():
    with pytest.raises(ValueError, match="choose one of \\['pytorch_fid', 'tf_graph'\\]"):
        inception.to_inception_input(jnp.zeros((1, 8, 8, 1)), preprocessing="antialias")


# --- Preprocessing. ---

def test_half_pixel_resize_equals_jax_image_resize():
    """pytorch-fid's convention equals jax.image.resize's bilinear upsampling (an independent implementation)."""
    x = np.random.default_rng(0).random((2, 8, 11, 3), np.float32)
    ours = inception.to_inception_input(x, size=45)       # any output size: the same code as for 299
    theirs = 2.0 * jax.image.resize(x, (2, 45, 45, 3), "bilinear", antialias=False) - 1.0
    np.testing.assert_allclose(ours, theirs, atol=2e-6)    # float32 rounding of the interpolation weights


def test_tf_graph_resize_and_scaling_by_hand():
    """2 -> 4 pixels, legacy TF: sources 0, ½, 1, 1.5 -> clamped neighbours; values [a, (a+b)/2, b, b]."""
    np.testing.assert_allclose(inception.bilinear_matrix(2, 4, "tf_graph"),
                               [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    # Half-pixel: sources max(0, -¼), ¼, ¾, 1¼ -> [a, ¾a + ¼b, ¼a + ¾b, b].
    np.testing.assert_allclose(inception.bilinear_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    white = inception.to_inception_input(jnp.ones((1, 4, 4, 1)), "tf_graph", size=5)
    np.testing.assert_allclose(white, 127.0 / 128.0)       # (255 - 128) / 128


def test_grey_images_are_repeated_to_three_channels():
    grey = np.random.default_rng(1).random((2, 9, 9, 1), np.float32)
    np.testing.assert_array_equal(inception.to_inception_input(grey, size=20),
                                  inception.to_inception_input(jnp.repeat(grey, 3, axis=-1), size=20))


# --- The network. ---

def test_network_matches_torch_reference_outputs(formula_variables):
    """The flax network on the formula weights gives the torch re-implementation's pool_3 and logits (32x32 RGB
    images resized to 299x299); outputs are finite, 2048-d and 1008-d, and logits_unbiased = logits - bias."""
    expected = np.load(DATA / "fid_inception_torch_outputs.npz")
    out = {k: np.asarray(v) for k, v in inception.inception_outputs(formula_variables, _formula_images()).items()}
    assert out["pool_3"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert all(np.isfinite(v).all() for v in out.values())
    for name in ("pool_3", "logits"):
        error = np.abs(out[name] - expected[name]).max() / np.abs(expected[name]).max()
        assert error < 1e-4, (name, error)    # float32 sums in a different order through 94 layers (seen: 1e-6)
    np.testing.assert_allclose(out["logits_unbiased"],
                               out["logits"] - np.asarray(formula_variables["params"]["fc"]["bias"]), atol=1e-6)


def test_results_do_not_depend_on_the_batch(formula_variables):
    """An example's outputs are the same whatever else is in its batch and wherever it sits (batch-norm uses
    running statistics). The batch shape of the test above, so its compiled network is reused."""
    x = _formula_images()
    other = np.random.default_rng(0).random(x.shape[1:], np.float32)
    whole = inception.inception_outputs(formula_variables, x)
    mixed = inception.inception_outputs(formula_variables, np.stack([x[1], other]))
    for name in ("pool_3", "logits"):
        np.testing.assert_allclose(mixed[name][0], whole[name][1], rtol=1e-5, atol=1e-6)
        assert not np.allclose(mixed[name][1], whole[name][0], atol=1e-3)    # the other example does differ
