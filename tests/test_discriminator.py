"""PatchGAN NLayerDiscriminator: shapes, equivalence with a plain-torch taming reference
(train and eval mode, running statistics), init statistics, ActNorm, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.models import discriminator as dm


def images(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def torch_reference(ndf=64, n_layers=3, in_ch=3):
    """taming's NLayerDiscriminator (BatchNorm variant) written out in plain torch.nn."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    layers = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        stride = 2 if n < n_layers else 1
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
    layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]

    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(*layers)

        def forward(self, x):
            return self.main(x)
    return Ref()


def load_into_torch(ref, variables, n_layers=3):
    import torch
    sd = ref.state_dict()
    for (col, mod, name), key in dm.torch_key_map(n_layers).items():
        v = np.asarray(variables[col][mod][name])
        if v.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
            v = v.transpose(3, 2, 0, 1)
        assert sd[key].shape == v.shape, key
        sd[key] = torch.from_numpy(v.copy())
    ref.load_state_dict(sd)


def to_nchw(x):
    import torch
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def jit_init(module, rng, x, train=True):
    return jax.jit(module.init, static_argnames="train")(rng, x, train=train)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_output_shape_64_and_256():
    disc = dm.NLayerDiscriminator(ndf=8)
    for size, out in ((64, 6), (256, 30)):
        shape = jax.eval_shape(lambda x: disc.init_with_output(jax.random.PRNGKey(0), x)[0],
                               jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
        assert shape.shape == (2, out, out, 1)


def test_matches_torch_train_and_eval_and_running_stats():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    disc = dm.NLayerDiscriminator()
    x = images(0, (4, 64, 64, 3))
    variables = jit_init(disc, jax.random.PRNGKey(1), x)
    # init leaves the running statistics at PyTorch's initial values.
    np.testing.assert_array_equal(variables["batch_stats"]["norm1"]["mean"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"]["norm1"]["var"], 1.0)
    ref = torch_reference()
    load_into_torch(ref, variables)

    ref.train()
    with torch.no_grad():
        want_train = ref(to_nchw(x)).numpy().transpose(0, 2, 3, 1)
    got_train, upd = disc.apply(variables, x, train=True, mutable=["batch_stats"])
    assert got_train.shape == (4, 6, 6, 1)
    assert rel_err(got_train, want_train) < 1e-5

    # Running stats after one train-mode call: momentum 0.1, unbiased variance (as torch).
    sd = ref.state_dict()
    for n, idx in ((1, 3), (2, 6), (3, 9)):
        np.testing.assert_allclose(upd["batch_stats"][f"norm{n}"]["mean"],
                                   sd[f"main.{idx}.running_mean"].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(upd["batch_stats"][f"norm{n}"]["var"],
                                   sd[f"main.{idx}.running_var"].numpy(), rtol=1e-5, atol=1e-6)

    # The unbiased correction is there: n/(n-1) with n = 4*7*7 at the last norm.
    var_run = np.asarray(upd["batch_stats"]["norm3"]["var"])
    assert not np.allclose(var_run, flax_biased_running_var(disc, variables, x), rtol=1e-4)

    ref.eval()
    x2 = images(2, (3, 64, 64, 3))
    with torch.no_grad():
        want_eval = ref(to_nchw(x2)).numpy().transpose(0, 2, 3, 1)
    got_eval = disc.apply({**variables, **upd}, x2, train=False)
    assert rel_err(got_eval, want_eval) < 1e-5
    # Eval mode really uses the running stats: it differs from a train-mode pass on x2.
    got_bn = disc.apply({**variables, **upd}, x2, train=True, mutable=["batch_stats"])[0]
    assert rel_err(got_eval, got_bn) > 1e-2


def flax_biased_running_var(disc, variables, x):
    """What the last norm's running var would be with the biased batch variance (flax's)."""
    _, inter = disc.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                          capture_intermediates=lambda mdl, _: mdl.name == "conv3")
    h = np.asarray(inter["intermediates"]["conv3"]["__call__"][0], np.float64)
    return 0.9 * 1.0 + 0.1 * h.reshape(-1, h.shape[-1]).var(axis=0)


def test_param_tree_and_init_statistics():
    disc = dm.NLayerDiscriminator()
    params = jit_init(disc, jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3)), False)["params"]
    assert set(params["conv_in"]) == {"kernel", "bias"}
    assert set(params["conv_out"]) == {"kernel", "bias"}
    for n in (1, 2, 3):
        assert set(params[f"conv{n}"]) == {"kernel"}  # bias-free before BatchNorm
        assert set(params[f"norm{n}"]) == {"scale", "bias"}
    widths = [params[k]["kernel"].shape for k in ("conv_in", "conv1", "conv2", "conv3", "conv_out")]
    assert widths == [(4, 4, 3, 64), (4, 4, 64, 128), (4, 4, 128, 256), (4, 4, 256, 512),
                      (4, 4, 512, 1)]
    k = np.asarray(params["conv3"]["kernel"])  # 2M draws
    assert abs(k.std() - 0.02) < 2e-4 and abs(k.mean()) < 1e-4
    scales = np.concatenate([np.asarray(params[f"norm{n}"]["scale"]) for n in (1, 2, 3)])
    assert abs(scales.mean() - 1.0) < 5e-3 and 0.015 < scales.std() < 0.025
    assert all(np.all(params[f"norm{n}"]["bias"] == 0) for n in (1, 2, 3))
    # Conv biases keep torch's default U(+-1/sqrt(fan_in)) (taming's weights_init skips them).
    b = np.asarray(params["conv_in"]["bias"])
    bound = 1 / np.sqrt(16 * 3)
    assert np.all(np.abs(b) <= bound) and b.std() > bound / 4


def test_actnorm_data_init_and_flag():
    disc = dm.NLayerDiscriminator(ndf=8, norm="act")
    x = images(4, (4, 32, 32, 3)) * 3.0 + 1.5
    variables = jit_init(disc, jax.random.PRNGKey(5), x)
    params = variables["params"]
    assert "bias" in params["conv1"]  # taming keeps conv biases with ActNorm
    assert int(variables["batch_stats"]["norm1"]["initialized"]) == 1
    assert float(jnp.abs(params["norm1"]["loc"]).max()) > 0  # written from the data

    def norm1_out(vs, xx, **kw):
        _, inter = disc.apply(vs, xx, capture_intermediates=lambda m, _: m.name == "norm1",
                              mutable=["intermediates"], **kw)
        return np.asarray(inter["intermediates"]["norm1"]["__call__"][0], np.float64)

    h = norm1_out(variables, x, train=False).reshape(-1, 16)
    np.testing.assert_allclose(h.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(h.std(0, ddof=1), 1.0, rtol=1e-4)
    # Train-mode calls in a train step (params immutable) do not re-initialise: on another
    # batch they give the eval-mode (plain affine) output, not a re-normalised one.
    y = images(6, (4, 32, 32, 3)) * 0.5 - 2.0
    h_train = norm1_out(variables, y, train=True).reshape(-1, 16)
    np.testing.assert_allclose(h_train, norm1_out(variables, y, train=False).reshape(-1, 16),
                               rtol=1e-6, atol=1e-6)
    assert np.abs(h_train.std(0, ddof=1) - 1.0).max() > 0.1

    # initialize_actnorm re-initialises on another batch.
    reinit = dm.initialize_actnorm(disc, variables, y)
    hy = norm1_out(reinit, y, train=False).reshape(-1, 16)
    np.testing.assert_allclose(hy.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(hy.std(0, ddof=1), 1.0, rtol=1e-4)
    assert not np.allclose(reinit["params"]["norm1"]["loc"], params["norm1"]["loc"])


def test_sharded_batch_gives_global_batch_statistics():
    devices = np.array(jax.devices())
    if devices.size < 2:
        pytest.skip("needs several (fake) devices")
    mesh = Mesh(devices, ("data",))
    disc = dm.NLayerDiscriminator(ndf=8)
    x = images(7, (devices.size, 32, 32, 3)) + jnp.arange(devices.size)[:, None, None, None]
    variables = jit_init(disc, jax.random.PRNGKey(8), x)
    step = jax.jit(lambda v, xx: disc.apply(v, xx, train=True, mutable=["batch_stats"]))
    want, want_stats = step(variables, x)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    vs = jax.device_put(variables, NamedSharding(mesh, P()))
    got, got_stats = step(vs, xs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           got_stats, want_stats)
    # One image per device: per-device statistics would differ a lot from the global ones.
    per_device = step(variables, x[:1])[1]["batch_stats"]["norm1"]["mean"]
    assert not np.allclose(per_device, want_stats["batch_stats"]["norm1"]["mean"], atol=1e-3)


def test_bad_norm_is_rejected():
    with pytest.raises(ValueError, match="unknown norm"):
        dm.NLayerDiscriminator(norm="group").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
