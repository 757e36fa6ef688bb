"""The latent-diffusion stage: first-stage loading and its errors, conditioning dropout,
guidance, img2img / inpainting pipelines, resume, and train.py + sample.py end to end."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import set_fields  # noqa: F401 (conftest also sets up the 8 fake devices)
from ldm_fixtures import tiny_ldm_cli_args, tiny_ldm_config
from ldm_jax import parallel
from ldm_jax.config_checks import ConfigError
from ldm_jax.stages import first_stage as fs
from ldm_jax.stages import ldm as ldm_stage
from ldm_jax.stages import ldm_sample
from ldm_jax.training import ldm_step
from ldm_jax.training.loop import train


@pytest.fixture(scope="session")
def first_stage_dir(shapes_data_dir, tmp_path_factory):
    """A finished 2-step f=2 autoencoder (16x16x4 latents of 32px images)."""
    from test_autoencoder_stage import tiny_ae_config
    workdir = str(tmp_path_factory.mktemp("first_stage"))
    train(tiny_ae_config(shapes_data_dir, **{"training.num_steps": 2}), workdir)
    return workdir


@pytest.fixture(scope="session")
def parts(shapes_data_dir, first_stage_dir):
    """(config, first stage, tokenizer, model, schedule, random params) of the tiny ldm_kl8."""
    from ldm_jax.data import pipeline, tokenizer
    config = tiny_ldm_config(shapes_data_dir, first_stage_dir)
    mesh = parallel.make_mesh()
    first = fs.load(config, mesh)
    source = pipeline.load_source(config.data, prepare=False)
    from ldm_jax.stages.ldm_text import captions_of
    tok = tokenizer.train_word_tokenizer(captions_of(source), config.text_encoder.max_length)
    model, schedule = ldm_stage.build_parts(config, first, tok)
    import optax
    state = jax.jit(lambda k: ldm_step.init_state(config, model, optax.identity(), k,
                                                  fs.latent_shape(config, first, 1)))(
        jax.random.PRNGKey(0))
    # The U-Net's output layer starts at zero (as SD's); perturb every weight so outputs
    # depend on the inputs and the conditioning.
    leaves, treedef = jax.tree_util.tree_flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [
        p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return config, first, tok, model, schedule, params


def _images(config, n, split="test"):
    records = ldm_sample.records_of(config, split, n)
    return np.stack([np.asarray(r["image"], np.float32) / 127.5 - 1 for r in records]), records


# ------------------------------------------------------------------ first stage


def test_first_stage_errors_name_the_fix(shapes_data_dir, first_stage_dir, tmp_path):
    config = tiny_ldm_config(shapes_data_dir, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="does not exist.*python train.py "
                       "--config=configs/autoencoder_kl_f8_shapes.py"):
        fs.inspect(config)
    unfinished = str(tmp_path / "unfinished")
    shutil.copytree(first_stage_dir, unfinished)
    os.remove(os.path.join(unfinished, "latent_scale.json"))
    with pytest.raises(ConfigError, match="has not finished training.*finish it with"):
        fs.inspect(config, unfinished)
    config.first_stage.latent_channels = 3
    with pytest.raises(ConfigError, match="has 4 latent channels but "
                       "first_stage.latent_channels=3"):
        fs.inspect(config, first_stage_dir)
    config.first_stage.latent_channels = 4
    info = fs.inspect(config, first_stage_dir)
    assert info["factor"] == 2 and info["channels"] == 4


def test_posterior_mode_uses_the_means_and_their_scale(parts):
    config, sample = parts[0], parts[1]  # ldm_kl8 trains on posterior samples, as LDM
    stored = fs.inspect(config)["scale"]
    assert sample.posterior == "sample" and sample.scale == pytest.approx(stored["scale"])
    config = config.copy_and_resolve_references()
    config.first_stage.posterior = "mode"
    mode = fs.load(config, parallel.make_mesh())
    assert mode.scale == pytest.approx(stored["mode_scale"])
    x, _ = _images(config, 8)
    variables = {"params": mode.params["params"]["autoencoder"]}
    mean = mode.model.apply(variables, jnp.asarray(x), method=mode.model.encode).mode()
    z = mode.encode(mode.params, jnp.asarray(x), jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(z), np.asarray(mean) * mode.scale, rtol=1e-5,
                               atol=1e-6)
    z_sample = sample.encode(sample.params, jnp.asarray(x), jax.random.PRNGKey(0))
    assert not np.allclose(np.asarray(z_sample) / sample.scale, np.asarray(mean), atol=1e-3)


def test_changed_first_stage_is_refused(parts, tmp_path):
    config, first = parts[0], parts[1]
    record = dict(first.record(), step=first.step + 100)
    with pytest.raises(ConfigError, match="changed since this run started"):
        fs.load(config, parallel.make_mesh(), record)


def test_latents_are_scaled_and_decode_back(parts):
    config, first = parts[0], parts[1]
    x, _ = _images(config, 8)
    z = first.encode(first.params, jnp.asarray(x), jax.random.PRNGKey(0))
    assert z.shape == (8, 16, 16, 4)
    variables = {"params": first.params["params"]["autoencoder"]}
    raw = first.model.apply(variables, jnp.asarray(x), method=first.model.encode).mode()
    # the posterior sample, times the scale: close to the scaled mean for a sharp posterior
    assert np.allclose(np.asarray(first.decode(first.params, raw * first.scale)),
                       np.asarray(first.model.apply(variables, raw, method=first.model.decode)),
                       atol=1e-5)


# ------------------------------------------------------------------ conditioning


def test_caption_dropout_rate_and_empty_caption(parts):
    config, first, tok = parts[0], parts[1], parts[2]
    n = 4000
    ids = np.tile(tok.encode(["a small red circle in the center on a gray background"])[0],
                  (n, 1))
    batch = {"image": jnp.zeros((n, 2, 2, 3)), "ids": jnp.asarray(ids),
             "mask": jnp.asarray(ids != tok.pad_id),
             "labels": jnp.zeros((n, 1), jnp.int32)}
    empty = ldm_stage.empty_tokens(tok)
    cond = ldm_step.training_cond(config, first, first.params, batch, jax.random.PRNGKey(3),
                                  empty)
    dropped = np.all(np.asarray(cond["ids"]) == empty[0][0], axis=1)
    assert abs(dropped.mean() - config.conditioning.p_uncond) < 0.02, dropped.mean()
    assert np.array_equal(np.asarray(cond["mask"])[dropped],
                          np.repeat(empty[1], dropped.sum(), 0))
    # labels are withheld in exactly the same rows
    assert np.array_equal(np.asarray(cond["labels"])[:, 0] == -2, dropped)


def test_padded_tokens_do_not_change_the_unet_output(parts):
    config, _, tok, model, _, params = parts
    ids, mask = tok.encode(["a large blue square at the top on a white background"] * 2)
    ids2 = ids.copy()
    ids2[:, mask[0].sum():] = 5  # garbage where the mask says padding
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 4))
    t = jnp.array([10, 500])
    apply = jax.jit(lambda i: model.apply(params, x, t, {"ids": i, "mask": jnp.asarray(mask)}))
    out = lambda i: apply(jnp.asarray(i))
    np.testing.assert_allclose(np.asarray(out(ids)), np.asarray(out(ids2)), atol=1e-6)
    other, _ = tok.encode(["a small red cross on the left on a black background"] * 2)
    assert not np.allclose(np.asarray(out(ids)), np.asarray(out(other)), atol=1e-4)


def test_guidance_scale_one_equals_the_conditional_model(parts):
    from ldm_jax.pipelines.latent import make_latent_sampler, sample_latent_images
    config, first, tok, model, schedule, params = parts
    prompts = ["a large red circle in the center on a gray background",
               "a small green cross at the top on a white background"]
    cond, uncond = ldm_sample.conditions(config, tok, prompts, negative="red")
    plain = make_latent_sampler(model, first, schedule, config, 2)
    guided = make_latent_sampler(model, first, schedule, config, 2, guided=True)
    a = sample_latent_images(plain, params, first.params, 0, 3, 0.0, 1.0, cond)
    b = sample_latent_images(guided, params, first.params, 0, 3, 0.0, 1.0, cond, uncond)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    c = sample_latent_images(guided, params, first.params, 0, 3, 0.0, 4.0, cond, uncond)
    assert not np.allclose(np.asarray(a), np.asarray(c), atol=1e-4)
    # a new prompt, seed, step count and scale reuse the compiled program
    cond2, uncond2 = ldm_sample.conditions(config, tok, prompts[::-1])
    sample_latent_images(guided, params, first.params, 1, 4, 0.0, 2.0, cond2, uncond2)
    assert guided._cache_size() == 1


def test_img2img_strength_zero_returns_the_encoded_input(parts):
    from ldm_jax.pipelines.latent import make_latent_sampler, sample_latent_images
    config, first, tok, model, schedule, params = parts
    x, records = _images(config, 2)
    cond, _ = ldm_sample.conditions(config, tok, [r["caption"].decode() for r in records])
    fn = make_latent_sampler(model, first, schedule, config, 2, task="img2img")
    out = sample_latent_images(fn, params, first.params, 0, 5, 0.0, 1.0, cond, images=x,
                               strength=0.0)
    # the sampler ran no step: the output is the first stage's reconstruction of the input
    init_rng = jax.random.split(jax.random.PRNGKey(0))[0]
    z = first.encode(first.params, jnp.asarray(x), init_rng)
    expected = jnp.clip(first.decode(first.params, z), -1, 1)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)
    half = sample_latent_images(fn, params, first.params, 0, 5, 0.0, 1.0, cond, images=x,
                                strength=0.6)
    assert not np.allclose(np.asarray(half), np.asarray(expected), atol=1e-3)


def test_blended_inpainting_keeps_unmasked_pixels(parts):
    from ldm_jax.pipelines.latent import make_latent_sampler, sample_latent_images
    config, first, tok, model, schedule, params = parts
    x, records = _images(config, 2)
    cond, _ = ldm_sample.conditions(config, tok, [r["caption"].decode() for r in records])
    mask = ldm_sample.default_mask(x.shape)
    fn = make_latent_sampler(model, first, schedule, config, 2, task="inpaint")
    out = np.asarray(sample_latent_images(fn, params, first.params, 0, 3, 0.0, 1.0, cond,
                                          images=x, mask=mask))
    keep = mask[..., 0] == 0
    assert np.array_equal(out[keep], x[keep])
    assert not np.allclose(out[~keep], x[~keep], atol=1e-2)


@pytest.mark.parametrize("concat,extra", [("inpaint", 5), ("lowres", None)])
def test_concat_conditioned_train_step_shapes(shapes_data_dir, first_stage_dir, concat, extra):
    """Inpainting widens the U-Net input by mask + masked latents; super-resolution needs a
    first stage whose f is a multiple of 4 (this one has f=2)."""
    import optax
    config = tiny_ldm_config(shapes_data_dir, first_stage_dir,
                             **{"conditioning.concat": concat, "conditioning.text": False})
    first = fs.load(config, parallel.make_mesh())
    if concat == "lowres":
        with pytest.raises(ConfigError, match="multiple of 4; this one has f=2"):
            ldm_stage.build_parts(config, first, None)
        return
    model, schedule = ldm_stage.build_parts(config, first, None)
    assert model.unet.in_channels == 4 + extra
    tx = optax.adam(1e-3)
    shape = fs.latent_shape(config, first, 1)
    state = jax.eval_shape(lambda k: ldm_step.init_state(config, model, tx, k, shape),
                           jax.random.PRNGKey(0))
    step = ldm_step.make_train_step(config, model, first, schedule, tx, lambda s: 1e-3, None)
    batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)}
    new_state, metrics = jax.eval_shape(step, state, batch, {"first_stage": first.params})
    assert metrics["loss"].shape == ()
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)


def test_class_values_by_number_or_name(shapes_data_dir, first_stage_dir):
    from ldm_jax.data.conditioning import class_labels
    config = tiny_ldm_config(shapes_data_dir, first_stage_dir, base="ldm_kl8_class")
    labels, names = class_labels(config, ["triangle", "0"])
    assert labels.tolist() == [[2], [0]] and names == ["triangle", "circle"]
    with pytest.raises(ConfigError, match="is not 0..4 or one of"):
        class_labels(config, ["zebra"])
    config.model.label_keys = ("color_0", "shape_0")
    labels, _ = class_labels(config, ["color_0=blue,shape_0=cross"])
    assert labels.tolist() == [[4, 4]]
    with pytest.raises(ConfigError, match="missing \\['shape_0'\\]"):
        class_labels(config, ["color_0=blue"])


# ------------------------------------------------------------------ training


def test_resume_continues_exactly(shapes_data_dir, first_stage_dir, tmp_path):
    config = tiny_ldm_config(shapes_data_dir, first_stage_dir)
    straight = train(config, str(tmp_path / "a"))
    first_half = train(config, str(tmp_path / "b"), stop_at=2)
    second_half = train(config, str(tmp_path / "b"))
    assert [h["step"] for h in first_half + second_half] == [1, 2, 3, 4]
    np.testing.assert_allclose([h["loss"] for h in first_half + second_half],
                               [h["loss"] for h in straight], rtol=1e-6)
    with open(tmp_path / "b" / fs.RECORD_FILE) as f:
        assert json.load(f)["workdir"] == os.path.abspath(first_stage_dir)


def test_cli_train_then_sample_with_metadata(shapes_data_dir, first_stage_dir, tmp_path):
    from test_cli import run
    from ldm_jax.utils.image_grid import read_png_metadata
    workdir = str(tmp_path / "ldm")
    r = run(["train.py", "--config=configs/ldm_kl8.py", f"--workdir={workdir}",
             *tiny_ldm_cli_args(shapes_data_dir, first_stage_dir,
                                **{"training.num_steps": 2})])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "text encoder" in r.stdout + r.stderr and "step 2/2 | loss" in r.stdout + r.stderr
    assert os.path.exists(os.path.join(workdir, "tokenizer.json"))
    out = str(tmp_path / "images") + "/"
    prompt = "a large red triangle in the center on a gray background"
    r = run(["sample.py", f"--workdir={workdir}", f"--prompt={prompt}", "--prompt=a zebra",
             "--negative_prompt=blue", "--num=4", "--steps=3", "--guidance=2.5", "--seed=7",
             "--sampler=ddim", f"--out={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "zebra" in r.stdout  # the unknown word is reported
    files = sorted(os.listdir(out))
    assert files[:4] == [f"{i:06d}.png" for i in range(4)]
    meta = read_png_metadata(os.path.join(out, "000002.png"))
    assert meta["prompt"] == prompt and meta["negative_prompt"] == "blue"
    assert (meta["seed"], meta["sampler"], meta["steps"], meta["guidance"],
            meta["checkpoint_step"]) == ("7", "ddim", "3", "2.5", "2")
    # the grid, with the test split's captions written beside the images
    r = run(["sample.py", f"--workdir={workdir}", "--num=4", "--steps=2", "--split=test"])
    assert r.returncode == 0, r.stderr[-3000:]
    grid = os.path.join(workdir, "samples", "sample_step2_seed0.png")
    assert json.loads(read_png_metadata(grid)["prompts"])[0].endswith("background")
    r = run(["sample.py", f"--workdir={workdir}", "--class=3"])
    assert r.returncode == 2 and "not label-conditioned" in r.stderr


def test_pretrained_text_encoder_stays_frozen(parts, shapes_data_dir, first_stage_dir,
                                              tmp_path):
    """text_encoder.pretrained: the encoder's params come from the folder, are not trained or
    checkpointed, and sampling reads them back from there."""
    from ldm_jax.models import text_encoder_io
    config, _, tok, model, _, params = parts
    folder = str(tmp_path / "encoder")
    text_encoder_io.save_pretrained(folder, model.text_encoder, params["text_encoder"], tok)
    workdir = str(tmp_path / "ldm")
    overrides = {"text_encoder.pretrained": folder, "training.num_steps": 2}
    train(tiny_ldm_config(shapes_data_dir, first_stage_dir, **overrides), workdir)
    loaded_config = __import__("ldm_jax.config_utils", fromlist=["x"]).load_config(workdir)
    loaded = ldm_sample.load_workdir(workdir, loaded_config, parallel.make_mesh())
    # the U-Net trained, the encoder is exactly the pretrained one
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params["text_encoder"]),
                    jax.tree_util.tree_leaves(params["text_encoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the checkpoint's arrays (orbax names each by its base64 tree path) are the U-Net's only
    import base64
    with open(os.path.join(workdir, "checkpoints", "2", "state", "_sharding")) as f:
        paths = [base64.b64decode(k).decode() for k in json.load(f)]
    assert any(p.startswith("params.unet.") for p in paths)
    assert not any("text_encoder" in p for p in paths), paths[:5]
    wrong = tiny_ldm_config(shapes_data_dir, first_stage_dir, **overrides,
                            **{"text_encoder.width": 64})
    with pytest.raises(ConfigError, match="--config.text_encoder.width=32"):
        ldm_stage.ldm_text.pretrained_encoder(wrong)
    os.remove(os.path.join(folder, text_encoder_io.PARAMS_FILE))
    with pytest.raises(ConfigError, match="has no text_encoder.msgpack"):
        ldm_stage.ldm_text.pretrained_encoder(wrong)


# ------------------------------------------------------------------ paper configs, tfds data


def _unet_params(config, channels, factor):
    import optax
    model = ldm_step.build_model(config, None, channels, factor)
    s = config.data.image_size // factor
    state = jax.eval_shape(lambda k: ldm_step.init_state(config, model, optax.identity(), k,
                                                         (1, s, s, channels)),
                           jax.random.PRNGKey(0))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
    return model, {k: count(v) for k, v in state.params.items()}


def test_paper_configs_have_the_papers_model_sizes():
    from configs import ldm_celebahq256, ldm_cin256
    from ldm_jax import config_utils
    config = ldm_celebahq256.get_config()
    config_utils.validate(config)
    _, counts = _unet_params(config, 3, 4)
    assert round(counts["unet"] / 1e6) == 274, counts  # LDM paper, CelebA-HQ LDM-4: 274M
    config = ldm_cin256.get_config()
    config_utils.validate(config)
    model, counts = _unet_params(config, 4, 8)
    # the class becomes one 512-wide token the U-Net cross-attends to (LDM's ClassEmbedder)
    assert counts["class_embedder"] == 1002 * 512 and model.unet.context_dim == 512
    assert model.unet.label_sizes == ()
    tokens = model.class_embedder.init_with_output(
        jax.random.PRNGKey(0), jnp.array([[3], [-2]]))[0]
    assert tokens.shape == (2, 1, 512)


def test_class_context_train_step_traces(shapes_data_dir, first_stage_dir):
    import optax
    config = tiny_ldm_config(shapes_data_dir, first_stage_dir, base="ldm_kl8_class",
                             **{"conditioning.class_context": True,
                                "conditioning.class_embed_dim": 16})
    from ldm_jax import config_utils
    config_utils.validate(config)
    first = fs.load(config, parallel.make_mesh())
    model, schedule = ldm_stage.build_parts(config, first, None)
    tx = optax.adam(1e-3)
    state = jax.eval_shape(lambda k: ldm_step.init_state(
        config, model, tx, k, fs.latent_shape(config, first, 1)), jax.random.PRNGKey(0))
    assert set(state.params) == {"unet", "class_embedder"}
    step = ldm_step.make_train_step(config, model, first, schedule, tx, lambda s: 1e-3, None)
    batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32),
             "labels": jax.ShapeDtypeStruct((8, 1), jnp.int32)}
    _, metrics = jax.eval_shape(step, state, batch, {"first_stage": first.params})
    assert metrics["loss"].shape == ()
    config.conditioning.text = True
    with pytest.raises(ConfigError, match="choose one"):
        config_utils.validate(config)
