"""The Inception-v3 network of the standard FID (SPEC §8) in flax.linen, and a TF- and torch-free reader for its
weights file.

The network is the TensorFlow graph `inception-2015-12-05` that the reference FID (and the Inception Score) code
runs, as ported to PyTorch by pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`). It is torchvision's
Inception-v3 layout with the graph's own differences, which the port reproduces and so does this module:
1. 1008 classes (the graph's softmax), no auxiliary classifier;
2. the 3x3 average pools inside Mixed_5b..5d (A blocks), Mixed_6b..6e (C blocks) and Mixed_7b (first E block)
   average over the unpadded window only (TensorFlow's SAME average pool; torch's count_include_pad=False);
3. the pool branch of the last E block (Mixed_7c) is a 3x3 max pool, not an average pool.
Every convolution has no bias and is followed by batch normalization (eps = 1e-3) and a ReLU. "pool_3" is the
2048-d global average of Mixed_7c (the FID/KID features); "logits" = fc(pool_3), "logits_unbiased" = pool_3 Wᵀ
without the fc bias (what the original Inception Score code feeds its softmax).

Input preprocessing (`to_inception_input`): images in [0, 1] [B, H, W, C], grey repeated to 3 channels, resized to
299x299 by bilinear interpolation without antialiasing, and scaled to the network's [-1, 1]. Two presets:
- "pytorch_fid" (default): pytorch-fid's F.interpolate(align_corners=False) convention, source coordinate
  (i + ½)·H/299 - ½ clamped to [0, H-1], then 2u - 1. What the weights file's own code does.
- "tf_graph": the TensorFlow graph's legacy ResizeBilinear (align_corners=False, no half-pixel centres): source
  coordinate i·H/299, then (255u - 128)/128. For an upsampled 32x32 image the two grids differ by a shift of
  (H/299 - 1)/2 ≈ -0.45 source pixels and the scaling by 0.4 %, so FIDs differ slightly between the presets;
  published numbers computed with pytorch-fid correspond to "pytorch_fid". (Not checked against TensorFlow here.)

Weights: `load_fid_inception(path)` checks the file's SHA-256 (FID_WEIGHTS_SHA256) and reads the torch state
dict with `load_torch_state_dict`, which understands both torch serialization formats (the zip archive of torch
>= 1.6 and the older sequence of pickles) with a restricted unpickler that builds numpy arrays and nothing else.
Torch parameter names map onto the flax tree one to one (the flax modules carry the torch names):
    <module path>.conv.weight [O, I, kh, kw]  -> params/<module path>/conv/kernel [kh, kw, I, O]
    <module path>.bn.weight / .bn.bias        -> params/<module path>/bn/scale / bias
    <module path>.bn.running_mean / _var      -> batch_stats/<module path>/bn/mean / var
    <module path>.bn.num_batches_tracked      -> (ignored)
    fc.weight [1008, 2048] / fc.bias          -> params/fc/kernel [2048, 1008] / bias
"""
import collections
import functools
import hashlib
import os
import pickle
import types
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# SHA-256 of that file; its first 8 hex digits are the torch hub suffix of the file name.
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
NUM_CLASSES = 1008
INPUT_SIZE = 299


# --- The network. ---

class BasicConv(nn.Module):
    """Convolution without bias, batch normalization (running statistics, eps 1e-3), ReLU."""

    features: int
    kernel_size: tuple
    strides: int = 1
    padding: tuple = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    """3x3 average pool, stride 1, SAME padding; the average is over the unpadded part of each window."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_stride2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


# The pool branch of the E blocks: average in Mixed_7b, max in Mixed_7c (difference 3 of the module docstring).
_BRANCH_POOLS = {"avg": _avg_pool_3x3, "max": _max_pool_3x3}


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    pool: str

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_BRANCH_POOLS[self.pool](x))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """x [B, H, W, 3] in [-1, 1] (H = W = 299 for the standard features; any H, W >= 75 runs) -> {"pool_3"
    [B, 2048], "logits" [B, 1008], "logits_unbiased" [B, 1008]}."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x):
        x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(self.num_classes, name="fc")
        logits = fc(pool)
        return {"pool_3": pool, "logits": logits, "logits_unbiased": logits - fc.variables["params"]["bias"]}


# --- Input preprocessing: resize to 299x299 and scale to [-1, 1]. ---

def _half_pixel_source(n_in, n_out):
    """pytorch-fid's bilinear (align_corners=False): source (i + ½)·n_in/n_out - ½, negative values set to 0."""
    return np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)


def _asymmetric_source(n_in, n_out):
    """TensorFlow's legacy ResizeBilinear (align_corners=False, half_pixel_centers=False): source i·n_in/n_out."""
    return np.arange(n_out) * n_in / n_out


# preset -> (source coordinates of the output pixels, map from [0, 1] to the network's input range).
PREPROCESSING = {
    "pytorch_fid": (_half_pixel_source, lambda u: 2.0 * u - 1.0),
    "tf_graph": (_asymmetric_source, lambda u: (255.0 * u - 128.0) / 128.0),
}


def _check_preprocessing(preprocessing):
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"unknown Inception preprocessing {preprocessing!r}; choose one of {sorted(PREPROCESSING)}")


def bilinear_matrix(n_in, n_out, preprocessing="pytorch_fid"):
    """[n_out, n_in] float32 matrix of 1-D linear interpolation: row i holds the weights of output pixel i.

    Source coordinate s (by the preset's convention), i0 = floor(s), i1 = min(i0 + 1, n_in - 1), weights
    1 - (s - i0) and s - i0. Two of these, one per axis, make the separable bilinear resize.
    """
    _check_preprocessing(preprocessing)
    s = np.minimum(PREPROCESSING[preprocessing][0](n_in, n_out), n_in - 1)
    i0 = np.floor(s).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = s - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m.astype(np.float32)


def to_inception_input(images, preprocessing="pytorch_fid", size=INPUT_SIZE):
    """Images [B, H, W, C] in [0, 1] (C = 1 or 3) -> the network input [B, size, size, 3] (module docstring)."""
    _check_preprocessing(preprocessing)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Inception features need images [B, H, W, 1 or 3]; got shape {images.shape}")
    rows = jnp.asarray(bilinear_matrix(images.shape[1], size, preprocessing))
    cols = jnp.asarray(bilinear_matrix(images.shape[2], size, preprocessing))
    x = jnp.einsum("oh,bhwc,pw->bopc", rows, images, cols, precision=jax.lax.Precision.HIGHEST)
    x = jnp.broadcast_to(x, x.shape[:3] + (3,))
    return PREPROCESSING[preprocessing][1](x)


@functools.partial(jax.jit, static_argnames=("preprocessing",))
def inception_outputs(variables, images, preprocessing="pytorch_fid"):
    """{"pool_3", "logits", "logits_unbiased"} of images [B, H, W, C] in [0, 1] (resized to 299x299)."""
    return FIDInceptionV3().apply(variables, to_inception_input(images, preprocessing))


# --- Reading a torch state dict without torch. ---

# torch's typed storage classes (as pickled in a state dict) and the numpy dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "LongStorage": np.int64,
    "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# The pickle stream of the legacy format starts with this number, then the protocol version 1001.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, name):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _TensorRef:
    """A tensor as pickled: a view (offset, size, stride in elements) of a storage whose bytes may come later."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def materialize(self, storages):
        flat = storages[self.storage]
        extent = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
        if min((self.offset, *self.size, *self.stride)) < 0 or len(self.size) != len(self.stride):
            raise ValueError(f"a tensor of shape {self.size}, strides {self.stride}, offset {self.offset}")
        if min(self.size, default=1) > 0 and extent > flat.size:
            raise ValueError(f"a tensor of shape {self.size} reaches element {extent} of a storage of {flat.size}")
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size,
                                               [s * flat.itemsize for s in self.stride])
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride, [requires_grad, hooks, metadata])."""
    return _TensorRef(storage, storage_offset, size, stride)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict with numpy: only the globals of _ALLOWED_GLOBALS are resolved, so the file
    cannot run code. Storages are recorded by key as (storage type, number of elements)."""

    def __init__(self, file, storages):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict of tensors")
        return _ALLOWED_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        # zip format: ("storage", type, key, location, numel); legacy: the same plus view metadata.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (torch < 0.4 files) are not supported")
        key = str(pid[2])
        self.storages[key] = (pid[1].dtype, int(pid[4]))
        return key


def _unpickle(file, storages):
    return _StateDictUnpickler(file, storages).load()


def _read_zip(path):
    """torch >= 1.6: a zip archive <name>/data.pkl (the pickle), <name>/data/<key> (raw storage bytes) and
    <name>/byteorder ("little" or "big"; absent means little)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path} is a zip archive but not a torch checkpoint (no <name>/data.pkl)")
        prefix = pickles[0][:-len("data.pkl")]
        order = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        layout = {}
        with archive.open(pickles[0]) as f:
            obj = _unpickle(f, layout)
        storages = {}
        for key, (dtype, numel) in layout.items():
            raw = archive.read(f"{prefix}data/{key}")
            storages[key] = np.frombuffer(raw, dtype.newbyteorder("<" if order == "little" else ">"), numel)
    return obj, storages


def _read_legacy(path):
    """torch < 1.6: pickles of the magic number, the protocol version (1001) and the system info, then the object
    (storages as persistent ids), then the list of storage keys; then per key an int64 element count and the raw
    storage bytes, in that order."""
    with open(path, "rb") as f:
        if _unpickle(f, {}) != _LEGACY_MAGIC:
            raise ValueError(f"{path} is neither a torch zip checkpoint nor a legacy torch file")
        _unpickle(f, {})
        info = _unpickle(f, {})
        endian = "<" if info.get("little_endian", True) else ">"
        layout = {}
        obj = _unpickle(f, layout)
        storages = {}
        for key in _unpickle(f, {}):
            dtype, numel = layout[str(key)]
            count = int(np.frombuffer(f.read(8), endian + "i8")[0])
            if count != numel:
                raise ValueError(f"{path}: storage {key} holds {count} elements, its tensors expect {numel}")
            raw = f.read(numel * dtype.itemsize)
            storages[str(key)] = np.frombuffer(raw, dtype.newbyteorder(endian), numel)
    return obj, storages


def _native(a):
    return a.astype(a.dtype.newbyteorder("="), copy=False)


def load_torch_state_dict(path):
    """{name: numpy array} of a torch state dict file (torch.save of a dict of tensors), without torch.

    Both torch serialization formats are read (zip archive and legacy pickle stream); arrays come out in native
    byte order with their saved dtypes. Anything but a dict of tensors raises ValueError.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"     # a zip archive starts with a local file header
    try:
        obj, storages = (_read_zip if is_zip else _read_legacy)(path)
        if not isinstance(obj, dict) or not all(isinstance(v, _TensorRef) for v in obj.values()):
            raise ValueError(f"it holds a {type(obj).__name__}, not a state dict of tensors")
        return {name: _native(ref.materialize(storages)) for name, ref in obj.items()}
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a readable torch state dict: {error}") from error


# --- From the torch state dict to the flax variables. ---

# (parent module, torch leaf) -> (flax collection, flax leaf, conversion).
_TORCH_LEAVES = {
    ("conv", "weight"): ("params", "kernel", lambda w: w.transpose(2, 3, 1, 0)),   # OIHW -> HWIO
    ("bn", "weight"): ("params", "scale", lambda w: w),
    ("bn", "bias"): ("params", "bias", lambda w: w),
    ("bn", "running_mean"): ("batch_stats", "mean", lambda w: w),
    ("bn", "running_var"): ("batch_stats", "var", lambda w: w),
    ("fc", "weight"): ("params", "kernel", lambda w: w.T),
    ("fc", "bias"): ("params", "bias", lambda w: w),
}
_IGNORED_LEAVES = {("bn", "num_batches_tracked")}
_SHOWN = 8


@functools.cache
def variable_shapes():
    """{(collection, *module path, leaf): shape} of FIDInceptionV3's variables (traced once, read-only)."""
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3), jnp.float32))
    return types.MappingProxyType({path: leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()})


def _flax_path(name):
    parts = tuple(name.split("."))
    if parts[-2:] in _IGNORED_LEAVES:
        return None, None
    if len(parts) < 2 or parts[-2:] not in _TORCH_LEAVES:
        return ("unknown",), None
    collection, leaf, convert = _TORCH_LEAVES[parts[-2:]]
    return (collection, *parts[:-1], leaf), convert


def variables_from_state_dict(state_dict):
    """The flax variables {"params", "batch_stats"} of FIDInceptionV3 from the torch state dict of pytorch-fid's
    FID Inception (mapping in the module docstring). Every variable must be present once with its shape."""
    expected, found, unknown = variable_shapes(), {}, []
    for name, value in state_dict.items():
        path, convert = _flax_path(name)
        if path is None:
            continue
        if path not in expected:
            unknown.append(name)
            continue
        found[path] = np.asarray(convert(value), np.float32)
    wrong = [f"{'/'.join(p)} {found[p].shape} (expected {s})" for p, s in expected.items()
             if p in found and found[p].shape != s]
    missing = ["/".join(p) for p in expected if p not in found]
    if unknown or wrong or missing:
        problems = [(what, items) for what, items in (("unexpected names", unknown), ("wrong shapes", wrong),
                                                      ("missing variables", missing)) if items]
        raise ValueError("not the FID Inception's state dict: " + "; ".join(
            f"{len(items)} {what}: {', '.join(items[:_SHOWN])}" for what, items in problems))
    return traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in found.items()})


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_fid_inception(path, sha256=FID_WEIGHTS_SHA256):
    """The flax variables of the FID Inception from pytorch-fid's weights file at `path`.

    The file's SHA-256 must equal `sha256` (the published file's by default; None skips the check, e.g. for
    weights of one's own). A missing or different file raises ValueError that says where to download it.
    """
    path = os.fspath(path)
    where = f"download {FID_WEIGHTS_URL} (SHA-256 {FID_WEIGHTS_SHA256})"
    if not os.path.isfile(path):
        raise ValueError(f"Inception weights file {path!r} not found: {where} and pass its path")
    if sha256 is not None and (digest := file_sha256(path)) != sha256:
        raise ValueError(f"Inception weights file {path!r} has SHA-256 {digest}, not {sha256}: it is not "
                         f"pytorch-fid's FID Inception (or it is incomplete); {where}")
    return variables_from_state_dict(load_torch_state_dict(path))
