"""The autoencoder stage end to end: every shipped first-stage config validates and gives its
documented latents; the jitted generator + discriminator step keeps the discriminator frozen
before loss.disc_start, weighs the GAN term by the adaptive weight, and overfits a batch; the
real loop resumes exactly and writes latent_scale.json and evaluations; train.py and sample.py
--reconstruct work from the command line."""
import importlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, set_fields  # noqa: F401 (conftest also sets up the 8 fake devices)
from ldm_jax import config_utils
from ldm_jax.config_checks import ConfigError
from ldm_jax.evaluation.image_metrics import psnr
from ldm_jax.stages import autoencoder as ae
from ldm_jax.training import autoencoder_step
from ldm_jax.training.loop import train

# configs/autoencoder_kl_f8_shapes.py shrunk to a ~20k-parameter f=2 autoencoder on the 32px,
# 64-image dataset of conftest's shapes_data_dir fixture.
TINY_AE = {
    "data.image_size": 32,
    "data.num_train": 64,
    "model.ch": 8,
    "model.ch_mult": (1, 2),
    "model.num_res_blocks": 1,
    "model.norm_groups": 4,
    "model.z_channels": 4,
    "loss.disc_channels": 8,
    "loss.disc_layers": 2,
    "loss.pixel_loss": "l1",  # LDM's loss, which the reference computations here write out
    "optimizer.lr": 5e-4,
    "optimizer.warmup_steps": 0,
    "optimizer.schedule": "constant",
    "training.batch_size": 8,
    "training.log_every": 1,
    "training.checkpoint_every": 2,
    "training.sample_every": 0,
    "training.num_samples": 4,
    "training.progress_bar": False,
    "latent.num_images": 16,
}


def _items(data_dir, overrides):
    return {**TINY_AE, "data.data_dir": data_dir, **overrides}


def tiny_ae_config(data_dir: str = "", **overrides):
    """The tiny autoencoder config; overrides as {"loss.disc_start": 2} (dotted keys)."""
    from configs import autoencoder_kl_f8_shapes
    return set_fields(autoencoder_kl_f8_shapes.get_config(), _items(data_dir, overrides))


def tiny_ae_cli_args(data_dir: str, **overrides) -> list:
    """The same tiny config as train.py flags."""
    def render(v):
        return str(v).replace(" ", "") if isinstance(v, tuple) else str(v)
    return [f"--config.{k}={render(v)}" for k, v in _items(data_dir, overrides).items()]


def _pieces(config):
    """Model, discriminator, jitted init and jitted train step, built as build_run builds them."""
    model, disc = ae.build_model(config), ae.build_discriminator(config)
    tx, disc_tx, lr_fn = ae._optimizers(config)
    init = jax.jit(ae.init_fn(config, model, disc, tx, disc_tx))
    step = jax.jit(autoencoder_step.make_train_step(config, model, disc, tx, disc_tx, lr_fn,
                                                    config.model.kind))
    return model, disc, init, step


def _equal_trees(a, b) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ------------------------------------------------------------------ 1. configs and latent shapes

# config -> (image size, latent shape) as the configs' docstrings state them
DOCUMENTED_LATENTS = {
    "autoencoder_kl_f4": (256, (64, 64, 3)),
    "autoencoder_kl_f8": (256, (32, 32, 4)),
    "autoencoder_kl_f16": (256, (16, 16, 16)),
    "autoencoder_kl_f32": (256, (8, 8, 64)),
    "autoencoder_kl_f8_sd": (512, (64, 64, 4)),
    "autoencoder_vq_f4": (256, (64, 64, 3)),
    "autoencoder_vq_f8": (256, (32, 32, 4)),
    "autoencoder_kl_f8_shapes": (32, (4, 4, 4)),
}


def test_every_autoencoder_config_is_listed():
    names = {f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
             if f.startswith("autoencoder_") and f.endswith(".py") and f != "autoencoder_base.py"}
    assert names == set(DOCUMENTED_LATENTS)


def _shipped(name, tmp_path):
    config = importlib.import_module(f"configs.{name}").get_config()
    if config.loss.perceptual_weight > 0:
        # validate only checks that the LPIPS weights file exists; none is read here.
        lpips = tmp_path / "lpips.safetensors"
        lpips.write_bytes(b"")
        config.loss.lpips_path = str(lpips)
    return config


@pytest.mark.parametrize("name", sorted(DOCUMENTED_LATENTS))
def test_config_validates_and_gives_documented_latents(name, tmp_path):
    config = _shipped(name, tmp_path)
    assert config.stage == "autoencoder"
    config_utils.validate(config)
    size, latent = DOCUMENTED_LATENTS[name]
    assert config.data.image_size == size
    model = ae.build_model(config)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)

    def encode(key, x):
        out, _ = model.init_with_output({"params": key}, x, method=model.encode)
        return out.mean if config.model.kind == "kl" else out[0]

    z = jax.eval_shape(encode, jax.random.PRNGKey(0), x)
    assert z.shape == (2, *latent), (name, z.shape)
    # The image-size check rejects a size the downsampling factor does not divide.
    f = size // latent[0]
    config.data.image_size = size - f // 2
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        config_utils.validate(config)


def test_bad_image_size_names_the_field():
    # 60 is no size of the shapes dataset, whichever the model.
    config = tiny_ae_config(**{"data.image_size": 60, "model.ch_mult": (1, 2, 2, 4)})
    with pytest.raises(ConfigError, match=r"data\.image_size.*60"):
        config_utils.validate(config)
    # A valid dataset size that the downsampling factor (here 64) does not divide.
    config = tiny_ae_config(**{"model.ch_mult": (1,) * 7})
    with pytest.raises(ConfigError, match=r"data\.image_size=32 is not divisible by the "
                                          r"downsampling factor 64"):
        config_utils.validate(config)


# ------------------------------------------------------------------ 2-3. the train step with a GAN

DISC_START = 2


@pytest.fixture(scope="module")
def gan_trajectory():
    """Four jitted steps with loss.disc_start=2 on random 32px batches: the model pieces, the
    initial state, and (state before, batch, metrics) of every step, on the host."""
    config = tiny_ae_config(**{"loss.disc_start": DISC_START})
    config_utils.validate(config)
    model, disc, init, step = _pieces(config)
    state = init(jax.random.PRNGKey(0))
    records = []
    for i in range(4):
        x = jax.random.uniform(jax.random.PRNGKey(100 + i), (8, 32, 32, 3), minval=-1, maxval=1)
        batch = {"image": np.asarray(x)}
        before = jax.device_get(state)
        state, metrics = step(state, batch)
        records.append((before, batch, jax.device_get(metrics)))
    records.append((jax.device_get(state), None, None))
    return config, model, disc, records


def test_run_ending_before_disc_start_skips_the_gan_with_the_same_updates(gan_trajectory):
    """A run whose num_steps ends before disc_start compiles the step without the discriminator
    and makes the updates the full step makes before disc_start (its GAN terms weigh 0)."""
    config, _, _, records = gan_trajectory
    short = tiny_ae_config(**{"loss.disc_start": DISC_START, "training.num_steps": DISC_START})
    _, _, _, step = _pieces(short)
    state = records[0][0]
    for k in (0, 1):
        state, metrics = step(state, records[k][1])
        want = records[k + 1][0]
        assert float(metrics["d_weight"]) == 0.0  # no adaptive weight computed
        for got, ref in zip(jax.tree_util.tree_leaves(jax.device_get(state.params)),
                            jax.tree_util.tree_leaves(want.params)):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        assert _equal_trees(jax.device_get(state.disc_params), want.disc_params)
    assert float(records[0][2]["d_weight"]) > 0.0  # the full step does compute it


def test_discriminator_frozen_before_disc_start_then_trained(gan_trajectory):
    _, _, _, records = gan_trajectory
    states = [r[0] for r in records]  # states[k]: after k steps
    metrics = [r[2] for r in records[:-1]]
    init = states[0]
    assert [int(s.step) for s in states] == [0, 1, 2, 3, 4]
    assert init.disc_stats["batch_stats"], "no BatchNorm statistics to check"
    for k in (1, 2):  # the steps called with state.step 0 and 1 < disc_start
        s = states[k]
        assert _equal_trees(s.disc_params, init.disc_params), k
        assert _equal_trees(s.disc_stats, init.disc_stats), k
        assert _equal_trees(s.disc_opt_state, init.disc_opt_state), k
        assert not _equal_trees(s.params["autoencoder"], states[k - 1].params["autoencoder"]), k
        assert float(metrics[k - 1]["disc_factor"]) == 0.0
        assert float(metrics[k - 1]["disc_loss"]) == 0.0
    for k in (3, 4):  # state.step 2 and 3 >= disc_start: both networks train
        s, prev = states[k], states[k - 1]
        assert float(metrics[k - 1]["disc_factor"]) == 1.0
        assert float(metrics[k - 1]["disc_loss"]) > 0.0
        assert not _equal_trees(s.disc_params, prev.disc_params), k
        for name in ("mean", "var"):
            for layer in s.disc_stats["batch_stats"]:
                assert not np.array_equal(s.disc_stats["batch_stats"][layer][name],
                                          prev.disc_stats["batch_stats"][layer][name]), (k, layer)
        assert not _equal_trees(s.disc_opt_state, prev.disc_opt_state), k
        assert not _equal_trees(s.params["autoencoder"], prev.params["autoencoder"]), k


def _independent_d_weight(config, model, disc, state, x):
    """disc_weight * clip(|d nll/dW| / (|d g/dW| + 1e-4), 0, 1e4), W the decoder's conv_out
    kernel, from jax.grad of each loss written out here (KL: nll = sum(|x - xrec| / e^logvar
    + logvar) / B; g = -mean(D(xrec)) with D in train mode)."""
    key = jax.random.fold_in(state.rng, state.step)
    sample_key, dropout_key = jax.random.split(key)
    params = state.params["autoencoder"]
    logvar = state.params["logvar"]
    b = x.shape[0]

    def reconstruct(kernel):
        p = jax.tree_util.tree_map(lambda a: a, params)  # a copy of the dict structure
        p["decoder"] = dict(p["decoder"])
        p["decoder"]["conv_out"] = {**p["decoder"]["conv_out"], "kernel": kernel}
        xrec, _ = model.apply({"params": p}, x, sample_key, train=True,
                              rngs={"dropout": dropout_key})
        return xrec

    def nll(kernel):
        rec = jnp.abs(x - reconstruct(kernel))
        return jnp.sum(rec / jnp.exp(logvar) + logvar) / b

    def g(kernel):
        logits, _ = disc.apply({"params": state.disc_params, **state.disc_stats},
                               reconstruct(kernel), train=True, mutable=["batch_stats"])
        return -jnp.mean(logits)

    kernel = params["decoder"]["conv_out"]["kernel"]
    g_nll, g_g = jax.jit(lambda k: (jax.grad(nll)(k), jax.grad(g)(k)))(kernel)
    ratio = np.linalg.norm(np.asarray(g_nll, np.float64)) / (
        np.linalg.norm(np.asarray(g_g, np.float64)) + 1e-4)
    return config.loss.disc_weight * float(np.clip(ratio, 0.0, 1e4))


def test_adaptive_weight_matches_gradient_norms_at_the_last_layer(gan_trajectory):
    config, model, disc, records = gan_trajectory
    state, batch, metrics = records[3]  # state.step 3: the GAN term is on
    assert int(state.step) >= DISC_START and float(metrics["disc_factor"]) == 1.0
    expected = _independent_d_weight(config, model, disc, state, jnp.asarray(batch["image"]))
    # Away from the clamp, so the ratio itself is what is compared.
    assert 0.0 < expected < config.loss.disc_weight * 1e4 * 0.99, expected
    np.testing.assert_allclose(float(metrics["d_weight"]), expected, rtol=1e-4)
    # The generator's loss is weighted by it: loss = nll + kl_weight * kl + d_weight * g.
    m = metrics
    total = m["nll_loss"] + config.loss.kl_weight * m["kl_loss"] + m["d_weight"] * m["g_loss"]
    np.testing.assert_allclose(float(m["loss"]), float(total), rtol=1e-5)


# ------------------------------------------------------------------ 4. overfitting one batch

OVERFIT_STEPS = 300
# Measured on CPU: ~7 dB at init and ~22.9 dB after 300 steps (~21-23 dB over the last 100).
OVERFIT_MIN_PSNR = 20.0


def test_tiny_autoencoder_overfits_one_batch(shapes_data_dir):
    config = tiny_ae_config(shapes_data_dir, **{"optimizer.lr": 1e-3, "loss.disc_weight": 0.0})
    config_utils.validate(config)
    x = ae.held_out_images(config, 8, "train")  # the first 8 training images
    model, _, init, step = _pieces(config)
    reconstruct = ae._reconstruct_fn(model)  # posterior mode, train=False

    def quality(state):
        return float(jnp.mean(psnr(x, reconstruct(state.params, state.model_state, x))))

    state = init(jax.random.PRNGKey(0))
    before = quality(state)
    batch = {"image": x}
    for _ in range(OVERFIT_STEPS):
        state, metrics = step(state, batch)
    after = quality(state)
    assert float(metrics["disc_factor"]) == 0.0 and float(metrics["g_loss"]) == 0.0
    assert after > OVERFIT_MIN_PSNR, (before, after)
    assert after > before + 10.0, (before, after)


# ------------------------------------------------------------------ 5. the real loop: resume


def _comparable(history):
    """Every logged metric of every step but the throughput."""
    return [{k: v for k, v in h.items() if k != "images_per_sec"} for h in history]


@pytest.mark.parametrize("num_devices", [None, 1], ids=["8_devices", "1_device"])
def test_loop_resume_matches_uninterrupted_run(tmp_path, shapes_data_dir, num_devices):
    devices = None if num_devices is None else jax.devices()[:num_devices]
    evaluate = num_devices is None
    config = tiny_ae_config(shapes_data_dir, **{
        "training.num_steps": 6, "loss.disc_start": DISC_START,
        "training.sample_every": 6 if evaluate else 0})
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = train(config, straight_dir, devices=devices)
    assert [h["step"] for h in straight] == [1, 2, 3, 4, 5, 6]
    first = train(config, resumed_dir, devices=devices, stop_at=3)
    assert [h["step"] for h in first] == [1, 2, 3]
    second = train(config, resumed_dir, devices=devices)
    assert [h["step"] for h in second] == [4, 5, 6]
    # The GAN is off for steps 1-2 and on from step 3: both optimisers, the discriminator and
    # its BatchNorm statistics cross the resume.
    assert [h["disc_factor"] for h in straight] == [0, 0, 1, 1, 1, 1]
    assert all(h["disc_loss"] > 0 for h in straight[2:])
    assert _comparable(first) + _comparable(second) == _comparable(straight)

    scales = []
    for workdir in (straight_dir, resumed_dir):
        with open(os.path.join(workdir, ae.LATENT_SCALE_FILE)) as f:
            record = json.load(f)
        assert record["step"] == 6 and record["mode"] == "std"
        assert math.isfinite(record["scale"]) and record["scale"] > 0
        assert record["num_images"] == 16 and record["latent_shape"] == [16, 16, 4]
        np.testing.assert_allclose(record["scale"] * record["std"], 1.0, rtol=1e-6)
        scales.append(record["scale"])
        eval_path = os.path.join(workdir, ae.EVAL_FILE)
        png = os.path.join(workdir, "samples", "recon_00000006.png")
        if evaluate:
            with open(eval_path) as f:
                evals = [json.loads(line) for line in f]
            assert [e["step"] for e in evals] == [6]
            assert math.isfinite(evals[0]["psnr"]) and 0 < evals[0]["ssim"] <= 1
            with Image.open(png) as img:  # 4 pairs of 32x64 in a 2x2 grid, 2px padding
                assert img.size == (2 + 2 * 66, 2 + 2 * 34)
        else:
            assert not os.path.exists(eval_path) and not os.path.exists(png)
    assert scales[0] == scales[1]  # the same final params


# ------------------------------------------------------------------ 6. the command line


def test_cli_train_then_reconstruct(tmp_path, shapes_data_dir):
    from test_cli import _one_line_error, run
    workdir = str(tmp_path / "wd")
    r = run(["train.py", "--config=configs/autoencoder_kl_f8_shapes.py", f"--workdir={workdir}",
             *tiny_ae_cli_args(shapes_data_dir, **{"training.num_steps": 2})])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2/2 | loss" in r.stdout + r.stderr
    assert os.path.exists(os.path.join(workdir, ae.LATENT_SCALE_FILE))
    out = str(tmp_path / "pairs.png")
    r = run(["sample.py", f"--workdir={workdir}", "--reconstruct", "--num=4",
             "--split=validation", f"--out={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PSNR" in r.stdout and "SSIM" in r.stdout, r.stdout
    with Image.open(out) as img:
        # 4 input|reconstruction pairs: a 2x2 grid of 32x64 cells with 2px padding
        assert img.size == (2 + 2 * 66, 2 + 2 * 34) and img.mode == "RGB"
    r = run(["sample.py", f"--workdir={workdir}"])
    _one_line_error(r, "--reconstruct")
    # The evaluation command reconstructs the held-out split: rFID against the originals,
    # LPIPS with the weights given (random VGG weights stand in for torchvision's here), and
    # the shapes checker on the reconstructions and on the originals (the data's floor).
    from ldm_jax.convert.lpips_weights import save_converted
    from ldm_jax.models.lpips import LPIPS
    x = jnp.zeros((1, 32, 32, 3))
    lpips_file = save_converted(LPIPS().init(jax.random.PRNGKey(0), x, x)["params"],
                                str(tmp_path / "lpips.safetensors"))
    r = run(["-m", "ldm_jax.evaluate", f"--workdir={workdir}",
             "--metrics=psnr,ssim,lpips,fid,adherence", "--num=12", "--batch_size=4",
             f"--lpips={lpips_file}"])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(workdir, ae.EVAL_FILE)) as f:
        record = json.loads(f.readlines()[-1])
    assert record["source"] == "evaluate" and record["num"] == 12 and record["step"] == 2
    assert record["rfid"] > 0 and 0 < record["ssim"] < 1 and record["psnr"] > 0
    assert record["lpips"] > 0
    assert "rfid" in r.stdout and "lpips" in r.stdout
    assert record["adherence_data_held_out/all"] == 1.0  # the reader on clean renders
    assert 0 <= record["adherence_held_out/color"] <= 1
    assert any(l.startswith("adherence_held_out ") for l in r.stdout.splitlines()), r.stdout
    r = run(["-m", "ldm_jax.evaluate", f"--workdir={workdir}", "--metrics=lpips", "--num=4"])
    _one_line_error(r, "--lpips=PATH")


# ------------------------------------------------------------------ 7. the VQ variant


@pytest.mark.parametrize("ema", [False, True], ids=["codebook_loss", "ema_codebook"])
def test_vq_autoencoder_trains_with_the_gan(ema):
    """The VQ kind through the same step: codebook loss (or EMA codebook with restarts),
    perplexity and usage in the metrics, the discriminator on from step 1."""
    config = tiny_ae_config("", **{"model.kind": "vq", "model.n_embed": 16, "model.embed_dim": 4,
                                   "model.vq_ema": ema, "model.vq_restart_dead_codes": ema,
                                   "loss.disc_start": 1})
    config_utils.validate(config)
    _, _, init, step = _pieces(config)
    state = init(jax.random.PRNGKey(0))
    start = jax.device_get(state)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(3):
        batch = {"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)}
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    assert all(np.isfinite(v) for h in history for v in h.values()), history
    assert all(h["quant_loss"] > 0 and 1.0 <= h["perplexity"] <= 16.0 for h in history)
    assert all(0.0 < h["codebook_usage"] <= 1.0 for h in history)
    assert [h["disc_factor"] for h in history] == [0.0, 1.0, 1.0]
    assert not _equal_trees(start.disc_params, state.disc_params)
    if ema:  # the codebook is an EMA statistic, updated by the step, not a parameter
        assert "quantize" not in state.params["autoencoder"]
        assert not _equal_trees(start.model_state, state.model_state)
    else:
        assert state.model_state == {} or not jax.tree_util.tree_leaves(state.model_state)
        assert not np.array_equal(start.params["autoencoder"]["quantize"]["embedding"],
                                  state.params["autoencoder"]["quantize"]["embedding"])
