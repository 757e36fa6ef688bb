"""LPIPS weights from the files users have: torchvision's VGG16 and the lpips package's heads.

- VGG16: torchvision's `vgg16-397923af.pth` (https://download.pytorch.org/models/, fetched by
  the user; nothing downloads here), or a `.safetensors` file with the same keys
  `features.{0,2,5,...,28}.weight/.bias`. The classifier keys are ignored.
- Heads: the lpips package's `lpips/weights/v0.1/vgg.pth` (`lin{k}.model.1.weight`, (1, C, 1, 1)).
  `pip install --no-deps lpips` puts it on disk; `default_heads_path` finds it without importing
  lpips, whose import pulls torchvision (which fails beside the CPU torch build).

There is no LPIPS without the ImageNet VGG16: a randomly initialised VGG with real heads is not
a perceptual metric, so a caller that cannot load the VGG file must fail, not fall back.

torch is imported lazily (the `convert`/`test` extras), and `.pth` files are read with
`weights_only=True`: loading never runs pickled code.
"""
from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.torch_files import load_torch_state_dict
from ldm_jax.models.lpips import LPIPS_CHANNELS, VGG16_BLOCKS, vgg_conv_name


def _torchvision_conv_indices() -> dict[str, int]:
    """Our conv name -> index in torchvision's `features` Sequential (conv, ReLU, ..., pool)."""
    out, index = {}, 0
    for b, widths in enumerate(VGG16_BLOCKS):
        for i in range(len(widths)):
            out[vgg_conv_name(b, i)] = index
            index += 2  # the conv, then its ReLU
        index += 1  # the block's max-pool
    return out


VGG16_CONV_INDICES = _torchvision_conv_indices()  # conv1_1 -> 0, ..., conv5_3 -> 28


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; float() first since numpy has no bf16
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _read_state_dict(path: str, what: str) -> dict[str, np.ndarray]:
    """name -> float32 array from a `.safetensors` file (numpy reader) or a torch file
    (`weights_only=True`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return {k: _to_numpy(v) for k, v in load_file(path).items()}
    sd = load_torch_state_dict(path, what)
    return {k: _to_numpy(v) for k, v in sd.items()}


def vgg16_state_dict_to_params(sd: dict) -> dict:
    """`VGG16Features` params from a torchvision VGG16 state dict (conv OIHW -> HWIO).

    Raises KeyError naming every missing conv tensor, ValueError for a mis-shaped one or for
    `features.*` tensors that plain VGG16 does not have (vgg16_bn, a different net).
    """
    sd = {k: _to_numpy(v) for k, v in sd.items()}
    wanted = {f"features.{i}.{leaf}" for i in VGG16_CONV_INDICES.values()
              for leaf in ("weight", "bias")}
    extra = sorted(k for k in sd if k.startswith("features.") and k not in wanted)
    if extra:
        raise ValueError(f"unexpected VGG16 tensors {extra[:6]}: LPIPS uses plain vgg16 "
                         "(not vgg16_bn or another net)")
    missing = sorted(wanted - set(sd), key=lambda k: (int(k.split(".")[1]), k))
    if missing:
        raise KeyError(f"VGG16 state dict lacks {missing}: LPIPS needs all 13 convs of "
                       "torchvision's vgg16 (file vgg16-397923af.pth)")
    params, c_in = {}, 3
    for b, widths in enumerate(VGG16_BLOCKS):
        for i, width in enumerate(widths):
            name, idx = vgg_conv_name(b, i), VGG16_CONV_INDICES[vgg_conv_name(b, i)]
            w, bias = sd[f"features.{idx}.weight"], sd[f"features.{idx}.bias"]
            if w.shape != (width, c_in, 3, 3) or bias.shape != (width,):
                raise ValueError(f"features.{idx} ({name}) has weight {w.shape} and bias "
                                 f"{bias.shape}; VGG16 needs {(width, c_in, 3, 3)} and {(width,)}")
            # jnp.array copies, so params never alias the caller's buffers.
            params[name] = {"kernel": jnp.array(w.transpose(2, 3, 1, 0)), "bias": jnp.array(bias)}
            c_in = width
    return params


def lpips_heads_to_params(sd: dict) -> dict:
    """`LPIPS` head params {"lin{k}": {"kernel": (C, 1)}} from the lpips v0.1 vgg state dict."""
    sd = {k: _to_numpy(v) for k, v in sd.items()}
    wanted = [f"lin{k}.model.1.weight" for k in range(len(LPIPS_CHANNELS))]
    missing = [k for k in wanted if k not in sd]
    if missing:
        raise KeyError(f"LPIPS heads lack {missing}; expected the lpips package's "
                       "weights/v0.1/vgg.pth")
    extra = sorted(set(sd) - set(wanted))
    if extra:
        raise ValueError(f"unexpected tensors {extra[:6]} in the LPIPS heads; expected only "
                         f"{wanted} (the vgg heads, not alex or squeeze)")
    params = {}
    for k, (key, c) in enumerate(zip(wanted, LPIPS_CHANNELS)):
        w = sd[key]
        if w.shape != (1, c, 1, 1):
            raise ValueError(f"{key} has shape {w.shape}; the vgg heads need {(1, c, 1, 1)}")
        # The package clamps heads to >= 0 while training them; that is what keeps LPIPS >= 0.
        if (w < 0).any():
            raise ValueError(f"{key} has negative weights; these are not trained LPIPS heads")
        params[f"lin{k}"] = {"kernel": jnp.array(w.reshape(c, 1))}
    return params


def load_vgg16(path: str) -> dict:
    """`VGG16Features` params from torchvision's VGG16 weights file (.pth or .safetensors)."""
    return vgg16_state_dict_to_params(_read_state_dict(path, "VGG16 weights"))


def load_lpips_heads(path: str) -> dict:
    """`LPIPS` head params from the lpips package's `weights/v0.1/vgg.pth`."""
    return lpips_heads_to_params(_read_state_dict(path, "LPIPS heads"))


def default_heads_path() -> str | None:
    """The v0.1 vgg heads inside an installed lpips package, or None.

    Found with `find_spec`, which locates the package without running its `__init__` (that
    would import torchvision).
    """
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "weights", "v0.1", "vgg.pth")
        if os.path.isfile(path):
            return path
    return None


def lpips_params(vgg_path: str, heads_path: str | None = None) -> dict:
    """The full `LPIPS` params tree: VGG16 from `vgg_path`, heads from `heads_path` (default:
    the installed lpips package's file)."""
    heads_path = heads_path or default_heads_path()
    if heads_path is None:
        raise FileNotFoundError("no LPIPS heads file given and no lpips package installed: run "
                                "`pip install --no-deps lpips==0.1.4`, or pass the path of its "
                                "weights/v0.1/vgg.pth")
    return {"vgg": load_vgg16(vgg_path), **load_lpips_heads(heads_path)}


def save_converted(params: dict, path: str) -> str:
    """Write LPIPS params as one safetensors file (names like "vgg/conv1_1/kernel"), the file
    training reads with numpy alone, so training never needs torch."""
    from flax import traverse_util
    from safetensors.numpy import save_file
    flat = traverse_util.flatten_dict(params, sep="/")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}, path)
    return path


def load_converted(path: str) -> dict:
    """LPIPS params from a file written by `save_converted`; checked against the model's tree."""
    import jax
    from flax import traverse_util
    from safetensors.numpy import load_file

    from ldm_jax.models.lpips import LPIPS
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LPIPS weights at {path!r}; convert them with "
                                "`python -m ldm_jax.convert.lpips_weights --vgg=... --out=...`")
    flat = load_file(path)
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    expected = traverse_util.flatten_dict(jax.eval_shape(
        lambda a: LPIPS().init(jax.random.PRNGKey(0), a, a), x)["params"], sep="/")
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    wrong = sorted(k for k in set(expected) & set(flat) if flat[k].shape != expected[k].shape)
    if missing or extra or wrong:
        raise ValueError(f"{path} is not an LPIPS weights file from save_converted (missing "
                         f"{missing[:3]}, unexpected {extra[:3]}, wrong shapes {wrong[:3]})")
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def main(argv=None) -> None:
    """python -m ldm_jax.convert.lpips_weights --vgg=vgg16-397923af.pth --out=lpips.safetensors"""
    import argparse
    parser = argparse.ArgumentParser(description="Convert torchvision VGG16 + lpips heads into "
                                                 "the LPIPS file loss.lpips_path reads.")
    parser.add_argument("--vgg", required=True, help="torchvision vgg16 state dict (.pth or "
                                                     ".safetensors)")
    parser.add_argument("--heads", default=None, help="lpips weights/v0.1/vgg.pth (default: "
                                                      "from the installed lpips package)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    print(f"wrote {save_converted(lpips_params(args.vgg, args.heads), args.out)}")


if __name__ == "__main__":
    main()
