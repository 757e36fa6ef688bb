"""LPIPS (vgg, v0.1): our Flax port with converted weights against a plain torch.nn LPIPS.

The reference follows the lpips package's definition (torchvision VGG16 features tapped after
relu1_2/2_2/3_3/4_3/5_3, ScalingLayer, channel unit-normalisation with eps 1e-10, squared
difference, bias-free 1x1 heads, spatial mean, sum over layers), written here without importing
lpips (its import needs torchvision). VGG weights are random (the ImageNet file is never in a
wheel); the heads are the real ones shipped in the lpips wheel, which scripts/test.sh installs.
"""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.extend.core  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

from ldm_jax.convert.lpips_weights import (default_heads_path, load_lpips_heads,  # noqa: E402
                                           load_vgg16, lpips_params)
from ldm_jax.models.lpips import LPIPS, VGG16Features  # noqa: E402

nn = torch.nn

# torchvision's vgg16 `features` config "D" (M = 2x2 max-pool), and the lpips package's taps:
# the last index of each of its five slices (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
TAPS = (3, 8, 15, 22, 29)
HEAD_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # lpips.lpips.ScalingLayer
SCALE = (0.458, 0.448, 0.450)
RTOL = 1e-5

NO_LPIPS = ("the lpips package is not installed, so its LPIPS heads (weights/v0.1/vgg.pth) are "
            "missing: run scripts/test.sh, which installs lpips==0.1.4 with --no-deps")


class TorchVGG16(nn.Module):
    """torchvision's VGG16 layout, so the state dict has its key names (classifier shrunk)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(8, 4))  # only there to be ignored


class TorchLPIPS(nn.Module):
    def __init__(self, vgg: TorchVGG16, heads: dict):
        super().__init__()
        self.features = vgg.features
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in HEAD_CHANNELS)
        for k, lin in enumerate(self.lins):
            lin.weight.data.copy_(heads[f"lin{k}.model.1.weight"])

    def taps(self, x):
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features[:TAPS[-1] + 1]):
            h = layer(h)
            if i in TAPS:
                out.append(h)
        return out

    def forward(self, x0, x1):
        total = 0
        for lin, f0, f1 in zip(self.lins, self.taps(x0), self.taps(x1)):
            f0 = f0 / (torch.sqrt(torch.sum(f0 ** 2, dim=1, keepdim=True)) + 1e-10)
            f1 = f1 / (torch.sqrt(torch.sum(f1 ** 2, dim=1, keepdim=True)) + 1e-10)
            total = total + lin((f0 - f1) ** 2).mean(dim=(2, 3))
        return total[:, 0]


def _random_vgg(seed=0) -> TorchVGG16:
    """torchvision's init (kaiming fan_out) keeps activations O(1) through 13 layers; random
    biases so a dropped or misplaced bias shows."""
    torch.manual_seed(seed)
    vgg = TorchVGG16().eval()
    with torch.no_grad():
        for m in vgg.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                m.bias.normal_(0.0, 0.1)
    return vgg


@pytest.fixture(scope="module")
def heads_path():
    path = default_heads_path()
    if path is None:
        pytest.fail(NO_LPIPS)
    return path


@pytest.fixture(scope="module")
def vgg():
    return _random_vgg()


@pytest.fixture(scope="module")
def vgg_file(vgg, tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(vgg.state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(vgg, vgg_file, heads_path):
    """(jitted Flax LPIPS apply, torch reference), weights through our loaders."""
    params = lpips_params(vgg_file, heads_path)
    ref = TorchLPIPS(vgg, torch.load(heads_path, map_location="cpu", weights_only=True)).eval()
    ours = jax.jit(lambda x, y: LPIPS().apply({"params": params}, x, y))
    return ours, ref


def _images(rng, b, h, w):
    return rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_lpips_package_heads_are_installed_and_found_without_importing_lpips():
    before = {m for m in sys.modules if m.split(".")[0] in ("lpips", "torchvision")}
    path = default_heads_path()
    assert path is not None, NO_LPIPS
    assert path.replace("\\", "/").endswith("lpips/weights/v0.1/vgg.pth")
    after = {m for m in sys.modules if m.split(".")[0] in ("lpips", "torchvision")}
    assert after == before  # find_spec ran nothing of lpips (nor torchvision through it)


def test_converted_params_fill_exactly_our_tree(vgg_file, heads_path):
    params = lpips_params(vgg_file, heads_path)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    want = jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)["params"]
    flat = traverse_util.flatten_dict(params)
    assert {k: v.shape for k, v in flat.items()} == {
        k: v.shape for k, v in traverse_util.flatten_dict(want).items()}
    assert all(v.dtype == jnp.float32 for v in flat.values())


def test_vgg_features_match_torch(vgg, vgg_file):
    """All five taps, at a size whose pools floor odd sides (36x44 -> 9x11 -> 4x5 -> 2x2)."""
    x = _images(np.random.RandomState(0), 2, 36, 44)
    feats = VGG16Features().apply({"params": load_vgg16(vgg_file)}, jnp.asarray(x))
    with torch.no_grad():
        h, refs = _nchw(x), []
        for i, layer in enumerate(vgg.features[:TAPS[-1] + 1]):
            h = layer(h)
            if i in TAPS:
                refs.append(h.numpy().transpose(0, 2, 3, 1))
    assert [f.shape[1:3] for f in feats] == [(36, 44), (18, 22), (9, 11), (4, 5), (2, 2)]
    for f, r in zip(feats, refs):
        assert f.shape == r.shape
        assert np.abs(np.asarray(f) - r).max() <= RTOL * np.abs(r).max()


# Odd sizes (floor-mode pools) are covered feature by feature in test_vgg_features_match_torch.
@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 32, 32)])
def test_lpips_matches_torch_reference(models, shape):
    ours, ref = models
    rng = np.random.RandomState(sum(shape))
    x = _images(rng, *shape)
    # One unrelated image pair and, where the batch allows, a mild perturbation (a small value).
    y = _images(rng, *shape)
    if shape[0] > 1:
        y[1] = np.clip(x[1] + 0.1 * rng.randn(*shape[1:], 3), -1, 1)
    out = np.asarray(ours(jnp.asarray(x), jnp.asarray(y)))
    with torch.no_grad():
        want = ref(_nchw(x), _nchw(y)).numpy()
    assert out.shape == (shape[0],) and out.dtype == np.float32
    assert (want > 0).all()
    rel = np.abs(out - want) / np.abs(want)
    print(f"LPIPS {shape}: ours {out}, torch {want}, max relative error {rel.max():.2e}")
    assert rel.max() <= RTOL


def test_lpips_properties(models):
    ours, _ = models
    rng = np.random.RandomState(7)
    x = _images(rng, 2, 64, 64)  # the equivalence test's shape: no new compile
    noise = rng.randn(*x.shape).astype(np.float32)
    near, far = (np.clip(x + s * noise, -1, 1) for s in (0.05, 0.3))
    jx = jnp.asarray(x)
    np.testing.assert_array_equal(np.asarray(ours(jx, jx)), np.zeros(2, np.float32))
    # One value per image: a changed first image leaves the identical second one at exactly 0.
    mixed = np.asarray(ours(jx, jnp.asarray(np.stack([near[0], x[1]]))))
    assert mixed[0] > 0 and mixed[1] == 0
    d_near = np.asarray(ours(jx, jnp.asarray(near)))
    d_far = np.asarray(ours(jx, jnp.asarray(far)))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(far), jx)), d_far, rtol=1e-6)
    assert (d_near > 0).all() and (d_far > d_near).all()


def _primitive_dtypes(jaxpr, out=None):
    """{primitive name: set of output dtypes} over a jaxpr and its sub-jaxprs."""
    out = {} if out is None else out
    for eqn in jaxpr.eqns:
        out.setdefault(eqn.primitive.name, set()).update(str(v.aval.dtype) for v in eqn.outvars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _primitive_dtypes(sub, out)
    return out


def test_bf16_compute_keeps_fp32_params_and_statistics():
    """Traced, not compiled (a bf16 VGG compile costs seconds on CPU): convs in bf16, the
    normalisation's sums and the result in float32."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)["params"]
    assert {str(v.dtype) for v in jax.tree_util.tree_leaves(params)} == {"float32"}
    closed = jax.make_jaxpr(lambda p, a, b: LPIPS(dtype=jnp.bfloat16).apply({"params": p}, a, b))(
        params, x, x)
    dtypes = _primitive_dtypes(closed.jaxpr)
    assert dtypes["conv_general_dilated"] == {"bfloat16"}
    assert dtypes["reduce_sum"] == {"float32"} and dtypes["sqrt"] == {"float32"}
    assert [str(v.aval.dtype) for v in closed.jaxpr.outvars] == ["float32"]


def test_missing_conv_is_named(vgg, tmp_path):
    sd = vgg.state_dict()
    del sd["features.28.weight"]
    path = str(tmp_path / "vgg16.pth")
    torch.save(sd, path)
    with pytest.raises(KeyError, match=r"features\.28\.weight"):
        load_vgg16(path)


def test_safetensors_vgg_file_loads_the_same(vgg, vgg_file, tmp_path):
    from safetensors.numpy import save_file
    sd = {k: v.numpy() for k, v in vgg.state_dict().items()}
    path = str(tmp_path / "vgg16.safetensors")
    save_file(sd, path)
    a = traverse_util.flatten_dict(load_vgg16(path))
    b = traverse_util.flatten_dict(load_vgg16(vgg_file))
    assert a.keys() == b.keys() and len(a) == 26
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    del sd["features.0.bias"]
    save_file(sd, path)
    with pytest.raises(KeyError, match=r"features\.0\.bias"):
        load_vgg16(path)


def test_vgg_loader_refuses_other_nets(vgg, tmp_path):
    sd = vgg.state_dict()
    sd["features.1.running_mean"] = torch.zeros(64)  # vgg16_bn has BatchNorms in `features`
    path = str(tmp_path / "vgg16_bn.pth")
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"features\.1\.running_mean"):
        load_vgg16(path)
    sd = vgg.state_dict()
    sd["features.2.weight"] = torch.zeros(64, 32, 3, 3)
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"features\.2 \(conv1_2\)"):
        load_vgg16(path)


class _Payload:
    """A pickled object: loading it would run arbitrary code in a hostile file."""


def test_pickled_objects_are_refused(tmp_path):
    path = str(tmp_path / "hostile.pth")
    torch.save({"features.0.weight": _Payload()}, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_vgg16(path)


def test_heads_loader_checks_names_shapes_and_signs(heads_path, tmp_path):
    heads = torch.load(heads_path, map_location="cpu", weights_only=True)
    params = load_lpips_heads(heads_path)
    np.testing.assert_array_equal(np.asarray(params["lin3"]["kernel"])[:, 0],
                                  heads["lin3.model.1.weight"].numpy().reshape(-1))
    path = str(tmp_path / "heads.pth")
    cases = [
        ({k: v for k, v in heads.items() if k != "lin3.model.1.weight"}, KeyError, r"lin3\.model"),
        ({**heads, "lin1.model.1.weight": torch.ones(1, 192, 1, 1)}, ValueError, r"lin1.*192"),
        ({**heads, "lin5.model.1.weight": torch.ones(1, 512, 1, 1)}, ValueError, r"lin5"),
        ({**heads, "lin0.model.1.weight": -heads["lin0.model.1.weight"]}, ValueError, "negative"),
    ]
    for sd, error, message in cases:
        torch.save(sd, path)
        with pytest.raises(error, match=message):
            load_lpips_heads(path)


def test_bad_images_are_refused():
    def ours(x, y):  # the checks run before any parameter is read
        return LPIPS().apply({"params": {}}, x, y)
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        ours(x, jnp.zeros((1, 32, 36, 3)))
    with pytest.raises(ValueError, match="too small"):
        ours(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        ours(jnp.zeros((1, 3, 32, 32)), jnp.zeros((1, 3, 32, 32)))


def test_no_vgg_file_no_lpips(heads_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lpips_params(str(tmp_path / "vgg16-397923af.pth"), heads_path)


def test_converted_file_loads_without_torch_and_gives_the_same_lpips(vgg_file, heads_path,
                                                                     tmp_path):
    """Training reads LPIPS from the safetensors file the converter CLI writes (numpy only)."""
    import subprocess
    import sys

    from safetensors.numpy import load_file, save_file

    from ldm_jax.convert.lpips_weights import load_converted
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "lpips.safetensors")
    r = subprocess.run([sys.executable, "-m", "ldm_jax.convert.lpips_weights",
                        f"--vgg={vgg_file}", f"--heads={heads_path}", f"--out={out}"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = load_converted(out)
    direct = lpips_params(vgg_file, heads_path)
    rng = np.random.default_rng(0)
    x, y = (rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32) for _ in range(2))
    a = LPIPS().apply({"params": loaded}, x, y)
    b = LPIPS().apply({"params": direct}, x, y)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(np.min(a)) > 0

    flat = load_file(out)
    del flat["lin4/kernel"]
    broken = str(tmp_path / "broken.safetensors")
    save_file(flat, broken)
    with pytest.raises(ValueError, match="missing.*lin4/kernel"):
        load_converted(broken)
    with pytest.raises(FileNotFoundError, match="convert them"):
        load_converted(str(tmp_path / "nope.safetensors"))
