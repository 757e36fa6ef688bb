"""The transformer text encoder: parameter layout, masks (padding, causal), the penultimate
output, bf16, pooling, and equality with a small PyTorch implementation of the same network."""
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import traverse_util

from ldm_jax.models.initializers import init_from_one_draw
from ldm_jax.models.text_encoder import TextTransformer, pooled

VOCAB, MAX_LEN, WIDTH, DEPTH, HEADS = 23, 8, 32, 3, 4
SEQ = 6
EOS = 3


def _model(**kw):
    cfg = dict(vocab_size=VOCAB, max_length=MAX_LEN, width=WIDTH, depth=DEPTH, heads=HEADS)
    return TextTransformer(**{**cfg, **kw})


def _init(model):
    # One shared random draw: a fraction of the compile time of per-parameter initialisers.
    ids = jnp.zeros((1, MAX_LEN), jnp.int32)
    init = jax.jit(lambda key: init_from_one_draw(model.init, key, ids))
    return init(jax.random.PRNGKey(0))["params"]


def _apply(model, params, ids, mask=None, output="last"):
    # Eager: after the first call the ops of every variant are compiled already, which on CPU
    # is much faster for these tiny models than one jit compile per test.
    out = model.apply({"params": params}, jnp.asarray(ids),
                      None if mask is None else jnp.asarray(mask), output=output)
    return np.asarray(out, np.float32)


def _batch(seed=0, lengths=(5, 6, 2)):
    """Ids [BOS=2] words [EOS=3] [PAD=0]..., words drawn from ids >= 4, and their mask.

    Every test uses this one shape, (3, SEQ), so that eager ops compile once; SEQ < MAX_LEN
    checks that shorter inputs take the first position embeddings.
    """
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), SEQ), np.int32)
    for row, n in enumerate(lengths):
        ids[row, :n] = [2, *rng.integers(4, VOCAB, n - 2), EOS]
    return ids, ids != 0


@pytest.fixture(scope="module")
def params():
    return _init(_model())


def test_parameter_layout_and_count(params):
    shapes = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(params).items()}
    hidden = 4 * WIDTH
    expected = {"token_embedding/embedding": (VOCAB, WIDTH),
                "position_embedding/embedding": (MAX_LEN, WIDTH),
                "final_norm/scale": (WIDTH,), "final_norm/bias": (WIDTH,)}
    for i in range(DEPTH):
        p = f"layers_{i}/"
        for n in ("norm1", "norm2"):
            expected.update({p + n + "/scale": (WIDTH,), p + n + "/bias": (WIDTH,)})
        for n in ("q", "k", "v", "out"):
            expected.update({p + f"attn/{n}/kernel": (WIDTH, WIDTH),
                             p + f"attn/{n}/bias": (WIDTH,)})
        expected.update({p + "mlp/fc1/kernel": (WIDTH, hidden), p + "mlp/fc1/bias": (hidden,),
                         p + "mlp/fc2/kernel": (hidden, WIDTH), p + "mlp/fc2/bias": (WIDTH,)})
    assert shapes == expected
    w = WIDTH
    per_block = 2 * 2 * w + 4 * (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w)
    analytic = VOCAB * w + MAX_LEN * w + DEPTH * per_block + 2 * w
    assert sum(math.prod(s) for s in shapes.values()) == analytic


def test_output_shapes(params):
    ids, mask = _batch()
    out = _apply(_model(), params, ids, mask)
    assert out.shape == (3, SEQ, WIDTH) and np.isfinite(out).all()
    full = jax.eval_shape(_model().apply, {"params": params}, jnp.zeros((2, MAX_LEN), jnp.int32))
    assert full.shape == (2, MAX_LEN, WIDTH) and full.dtype == jnp.float32
    with pytest.raises(ValueError, match="max_length"):
        jax.eval_shape(_model().apply, {"params": params}, jnp.zeros((1, MAX_LEN + 1), jnp.int32))


@pytest.mark.parametrize("causal", [False, True])
def test_padding_positions_do_not_change_real_tokens(causal, params):
    model = _model(causal=causal)
    ids, mask = _batch()
    noisy = np.where(mask, ids, np.random.default_rng(1).integers(4, VOCAB, ids.shape))
    a, b = _apply(model, params, ids, mask), _apply(model, params, noisy, mask)
    np.testing.assert_allclose(a[mask], b[mask], atol=1e-5)
    # Without the mask the changed padding leaks into the real tokens (non-causal).
    if not causal:
        c = _apply(model, params, ids), _apply(model, params, noisy)
        assert np.abs(c[0][mask] - c[1][mask]).max() > 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_causal_mask(causal, params):
    model = _model(causal=causal)
    ids, _ = _batch(lengths=(SEQ,) * 3)
    changed = ids.copy()
    changed[:, 4] = np.where(ids[:, 4] == 4, 5, 4)
    a, b = _apply(model, params, ids), _apply(model, params, changed)
    diff_before = np.abs(a[:, :4] - b[:, :4]).max()
    assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-3
    if causal:
        assert diff_before < 1e-6
    else:
        assert diff_before > 1e-3


def test_penultimate_is_final_norm_of_block_depth_minus_1(params):
    model = _model(causal=True, activation="quick_gelu")
    ids, mask = _batch()
    last = _apply(model, params, ids, mask)
    penult = _apply(model, params, ids, mask, output="penultimate")
    assert np.abs(last - penult).max() > 1e-2
    # The same weights without the last block, in a model one block shallower.
    shallow = dict(params)
    del shallow[f"layers_{DEPTH - 1}"]
    ref = _apply(_model(causal=True, activation="quick_gelu", depth=DEPTH - 1), shallow, ids, mask)
    np.testing.assert_allclose(penult, ref, atol=1e-6)
    # Initialising for the penultimate output still creates the last block.
    init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, output="penultimate"))
    assert f"layers_{DEPTH - 1}" in init["params"]
    with pytest.raises(ValueError, match="output"):
        model.apply({"params": params}, ids, output="middle")


def test_bf16_compute_stays_close_to_fp32(params):
    ids, mask = _batch()
    ref = _apply(_model(), params, ids, mask)
    bf16 = _model(dtype=jnp.bfloat16)
    out = bf16.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    err = np.abs(np.asarray(out, np.float32) - ref)[mask]
    assert err.max() < 0.1 and err.mean() < 0.02


def test_pooled_takes_eos_position():
    ids = np.array([[2, 7, 9, EOS, 0, 0], [2, 22, EOS, EOS, EOS, EOS]], np.int32)
    hidden = jnp.arange(2 * 6 * 4, dtype=jnp.float32).reshape(2, 6, 4)
    np.testing.assert_array_equal(pooled(hidden, ids, eos_id=EOS), hidden[jnp.arange(2), [3, 2]])
    # Legacy CLIP: the end token is the largest id.
    np.testing.assert_array_equal(pooled(hidden, ids), hidden[jnp.arange(2), [2, 1]])


def test_plain_init_has_the_same_layout_and_init_scales(params):
    plain = jax.eval_shape(_model().init, jax.random.PRNGKey(0), jnp.zeros((1, MAX_LEN), jnp.int32))
    shapes = lambda t: jax.tree_util.tree_map(lambda x: x.shape, t)
    assert shapes(plain["params"]) == shapes(params)
    # CLIP's embedding scales (0.02, 0.01), not lecun's 1/sqrt(vocab), through the shared draw.
    tok = np.asarray(params["token_embedding"]["embedding"])
    pos = np.asarray(params["position_embedding"]["embedding"])
    assert 0.016 < tok.std() < 0.024 and 0.007 < pos.std() < 0.013
    kernel = np.asarray(params["layers_0"]["attn"]["q"]["kernel"])
    assert abs(kernel.std() * math.sqrt(WIDTH) - 1) < 0.1


def test_jit_matches_eager(params):
    ids, mask = _batch()
    model = _model(causal=True)
    fn = jax.jit(lambda p, i, m, output: model.apply({"params": p}, i, m, output=output),
                 static_argnames="output")
    for output in ("last", "penultimate"):
        np.testing.assert_allclose(fn(params, ids, mask, output=output),
                                   _apply(model, params, ids, mask, output), atol=1e-5)


# ---- equality with a PyTorch implementation of the same network ----------------------------

def _torch_encoder(params, causal, activation, eps=1e-5):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    t = lambda a: torch.tensor(np.asarray(a, np.float32))

    def linear(p):
        layer = nn.Linear(*p["kernel"].shape)
        layer.weight.data, layer.bias.data = t(p["kernel"]).T.contiguous(), t(p["bias"])
        return layer

    def norm(p):
        layer = nn.LayerNorm(p["scale"].shape[0], eps=eps)
        layer.weight.data, layer.bias.data = t(p["scale"]), t(p["bias"])
        return layer

    acts = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
            "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}

    class Block(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.norm1, self.norm2 = norm(p["norm1"]), norm(p["norm2"])
            self.q, self.k, self.v, self.out = (linear(p["attn"][n])
                                                for n in ("q", "k", "v", "out"))
            self.fc1, self.fc2 = linear(p["mlp"]["fc1"]), linear(p["mlp"]["fc2"])

        def forward(self, x, allowed):
            b, n, w = x.shape
            heads = lambda y: y.view(b, n, HEADS, w // HEADS).transpose(1, 2)
            h = self.norm1(x)
            q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
            scores = q @ k.transpose(-1, -2) / math.sqrt(w // HEADS)
            scores = scores.masked_fill(~allowed, float("-inf"))
            att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
            x = x + self.out(att)
            return x + self.fc2(acts[activation](self.fc1(self.norm2(x))))

    blocks = [Block(params[f"layers_{i}"]) for i in range(DEPTH)]
    final = norm(params["final_norm"])
    tok = t(params["token_embedding"]["embedding"])
    pos = t(params["position_embedding"]["embedding"])

    def run(ids, mask):
        ids, keep = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
        n = ids.shape[1]
        allowed = keep[:, None, None, :]
        if causal:
            allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
        x = tok[ids] + pos[:n]
        with torch.no_grad():
            for block in blocks:
                x = block(x, allowed)
            return final(x).numpy()

    return run


def _perturbed(params, seed=0):
    """Biases and norm scales away from their 0 / 1 init, so a misplaced one shows."""
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)
    for key, value in flat.items():
        noise = 0.1 * rng.standard_normal(value.shape).astype(np.float32)
        if key[-1] == "bias":
            flat[key] = value + noise
        elif key[-1] == "scale":
            flat[key] = value * (1 + noise)
    return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("causal,activation", [(True, "quick_gelu"), (False, "gelu"),
                                               (False, "gelu_tanh")])
def test_matches_torch_reference(causal, activation, params):
    model = _model(causal=causal, activation=activation)
    params = _perturbed(params)
    ids, mask = _batch(seed=2)
    ref = _torch_encoder(params, causal, activation)(ids, mask)
    out = _apply(model, params, ids, mask)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
