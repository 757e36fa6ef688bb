"""The first stage: a KL or VQ autoencoder trained with L1 (+ LPIPS) + KL/codebook + PatchGAN.

Evaluates PSNR/SSIM on a fixed held-out batch at each sample interval, and at the end of
training stores the latent scale the latent-diffusion stage reads (latent_scale.json).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import parallel
from ldm_jax.checkpoint import Checkpointer, abstract_with_sharding
from ldm_jax.config_checks import ConfigError
from ldm_jax.data import pipeline
from ldm_jax.stages import autoencoder_checks
from ldm_jax.stages.api import StageRun
from ldm_jax.training import autoencoder_step
from ldm_jax.training.metrics_logger import EVAL_FILE
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.utils.image_grid import save_grid

LATENT_SCALE_FILE = "latent_scale.json"
_GAN_KEYS = ("g_loss", "d_weight", "disc_loss", "grad_norm", "lr")
_CONSOLE_KEYS = {"kl": ("loss", "rec_loss", "kl_loss", *_GAN_KEYS),
                 "vq": ("loss", "rec_loss", "quant_loss", "perplexity", *_GAN_KEYS)}


def default_config():
    from configs import autoencoder_base
    return autoencoder_base.get_config()


def validate(config) -> None:
    autoencoder_checks.validate(config)


def build_model(config, compute_dtype: str | None = None):
    m = config.model
    common = dict(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                  attn_resolutions=tuple(m.attn_resolutions), z_channels=m.z_channels,
                  dropout=m.dropout, resolution=config.data.image_size,
                  norm_groups=m.norm_groups,
                  dtype=jnp.dtype(compute_dtype or config.training.compute_dtype))
    if m.kind == "kl":
        from ldm_jax.models.autoencoder import AutoencoderKL
        return AutoencoderKL(**common)
    from ldm_jax.models.autoencoder_vq import AutoencoderVQ
    return AutoencoderVQ(**common, embed_dim=m.embed_dim, n_embed=m.n_embed, beta=m.vq_beta,
                         legacy=m.vq_legacy, ema=m.vq_ema, ema_decay=m.vq_ema_decay,
                         restart_dead_codes=m.vq_restart_dead_codes)


def build_discriminator(config):
    from ldm_jax.models.discriminator import NLayerDiscriminator
    lc = config.loss
    return NLayerDiscriminator(ndf=lc.disc_channels, n_layers=lc.disc_layers, norm=lc.disc_norm)


def _optimizers(config):
    tx, lr_fn = make_optimizer(config.optimizer, config.training.num_steps)
    d_opt = config.optimizer.copy_and_resolve_references()
    d_opt.lr = config.loss.disc_lr or config.optimizer.lr
    disc_tx, _ = make_optimizer(d_opt, config.training.num_steps)
    return tx, disc_tx, lr_fn


def _image_shape(config):
    s = config.data.image_size
    return (s, s, 3)


def init_fn(config, model, disc, tx, disc_tx):
    return lambda key: autoencoder_step.init_state(config, model, disc, tx, disc_tx, key,
                                                   _image_shape(config))


def load_lpips(config):
    """The converted LPIPS params, or None (and a note) when loss.perceptual_weight is 0."""
    if config.loss.perceptual_weight == 0:
        return None
    from ldm_jax.convert.lpips_weights import load_converted
    return load_converted(os.path.expanduser(config.loss.lpips_path))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def build_run(config, mesh, workdir: str, source, is_main: bool) -> StageRun:
    model, disc = build_model(config), build_discriminator(config)
    tx, disc_tx, lr_fn = _optimizers(config)
    lpips = load_lpips(config)
    if lpips is not None:
        lpips = jax.device_put(lpips, parallel.replicated(mesh))
    kind = config.model.kind
    f = 2 ** (len(config.model.ch_mult) - 1)
    pixel = config.loss.pixel_loss.upper()
    lpips_note = ("LPIPS on" if lpips is not None
                  else f"no LPIPS (loss.perceptual_weight=0: {pixel} only)")
    evaluator = _Evaluator(config, model, workdir, is_main)

    def describe(abstract):
        return (f"{kind.upper()} autoencoder f={f}: {_count(abstract.params['autoencoder']):,} "
                f"parameters, discriminator {_count(abstract.disc_params):,}; {lpips_note}")

    def finish(state, step):
        # The weights sample.py and the next stage use: EMA when kept.
        params = state.ema_params if state.ema_params is not None else state.params
        return [write_latent_scale(config, model, params, state.model_state, workdir, step,
                                   source, is_main)]

    evaluate = None
    if config.eval.every:
        from ldm_jax.evaluation.evaluator import training_evaluator
        evaluate = training_evaluator(
            config, mesh, image_maker(config, mesh),
            lambda s: (s.ema_params if s.ema_params is not None else s.params, s.model_state))
    return StageRun(
        init=init_fn(config, model, disc, tx, disc_tx),
        train_step=autoencoder_step.make_train_step(config, model, disc, tx, disc_tx, lr_fn,
                                                    kind),
        describe=describe, frozen=lpips, console_keys=_CONSOLE_KEYS[kind],
        periodic=evaluator if config.training.sample_every else None,
        finish=finish, evaluate=evaluate, evaluate_every=config.eval.every)


def abstract_run(config, mesh):
    """(StageRun, global batch, frozen LPIPS params, notes) as shapes only, for planning memory
    (ldm_jax/memory_plan.py): the LPIPS weights need not be on disk."""
    import jax.numpy as jnp
    model, disc = build_model(config), build_discriminator(config)
    tx, disc_tx, lr_fn = _optimizers(config)
    lpips = None
    if config.loss.perceptual_weight:
        from ldm_jax.models.lpips import LPIPS
        x = jnp.zeros((1, 64, 64, 3))
        lpips = jax.eval_shape(lambda: LPIPS().init(jax.random.PRNGKey(0), x, x)["params"])
    b = config.training.batch_size
    batch = {"image": jax.ShapeDtypeStruct((b, *_image_shape(config)), jnp.float32)}
    run = StageRun(init=init_fn(config, model, disc, tx, disc_tx),
                   train_step=autoencoder_step.make_train_step(config, model, disc, tx,
                                                               disc_tx, lr_fn,
                                                               config.model.kind),
                   describe=lambda abstract: "")
    return run, batch, lpips, []


def _reconstruct_fn(model):
    @jax.jit
    def reconstruct(params, model_state, x):
        out = model.apply({"params": params["autoencoder"], **model_state}, x, None, train=False)
        return out[0]
    return reconstruct


def _encode_fn(model, kind):
    """(posterior samples, posterior means) of KL latents; VQ: the quantised latents twice."""
    @jax.jit
    def encode(params, model_state, x, key):
        variables = {"params": params["autoencoder"], **model_state}
        out = model.apply(variables, x, train=False, method=model.encode)
        return (out.sample(key), out.mode()) if kind == "kl" else (out[0], out[0])
    return encode


def held_out_images(config, num: int, split: str = "validation") -> np.ndarray:
    """The first `num` images of `split`, float32 in [-1, 1]."""
    source = pipeline.load_source(config.data, split=pipeline.split_name(config.data, split))
    if num > len(source):
        raise ConfigError(f"asked for {num} images but the {split} split has {len(source)}")
    return np.stack([np.asarray(source[i]["image"], np.float32) / 127.5 - 1.0
                     for i in range(num)])


def image_quality(x, xrec) -> dict:
    from ldm_jax.evaluation.image_metrics import psnr, ssim
    return {"psnr": float(jnp.mean(psnr(x, xrec))), "ssim": float(jnp.mean(ssim(x, xrec)))}


def save_pairs(x, xrec, path: str) -> str:
    """Each input beside its reconstruction, one pair per grid cell."""
    return save_grid(np.concatenate([np.asarray(x), np.asarray(xrec)], axis=2), path)


class _Evaluator:
    """PSNR/SSIM and an input|reconstruction PNG on a fixed held-out batch."""

    def __init__(self, config, model, workdir, is_main):
        self.config, self.workdir, self.is_main = config, workdir, is_main
        self.reconstruct = _reconstruct_fn(model)
        self.images = None

    def __call__(self, state, step: int) -> list:
        c = self.config
        if self.images is None:
            self.images = held_out_images(c, c.training.num_samples)
        params = state.ema_params if state.ema_params is not None else state.params
        xrec = jax.device_get(self.reconstruct(params, state.model_state, self.images))
        scores = image_quality(self.images, xrec)
        if not self.is_main:
            return []
        path = save_pairs(self.images, xrec,
                          os.path.join(self.workdir, "samples", f"recon_{step:08d}.png"))
        path_jsonl = os.path.join(self.workdir, EVAL_FILE)
        with open(path_jsonl, "a") as f:
            f.write(json.dumps({"step": step, **scores}) + "\n")
        return [f"eval at step {step}: PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f} "
                f"on {len(self.images)} held-out images; wrote {path}"]


def write_latent_scale(config, model, params, model_state, workdir, step, source,
                       is_main) -> str:
    """LDM's scale_by_std: 1/std of posterior samples over latent.num_images training images
    (or the fixed scale), and the same for the posterior means, written to
    WORKDIR/latent_scale.json for the latent stage."""
    source = pipeline.as_square(source, config.data)
    lat = config.latent
    record = {"step": int(step), "mode": lat.scale}
    if lat.scale == "fixed":
        record["scale"] = record["mode_scale"] = float(lat.fixed_scale)
    else:
        encode = _encode_fn(model, config.model.kind)
        n = min(lat.num_images, len(source))
        batch = config.training.num_samples
        samples, means = [], []
        for i, start in enumerate(range(0, n, batch)):
            x = np.stack([np.asarray(source[j]["image"], np.float32) / 127.5 - 1.0
                          for j in range(start, min(start + batch, n))])
            key = jax.random.fold_in(jax.random.PRNGKey(config.seed), i)
            z, mean = jax.device_get(encode(params, model_state, x, key))
            samples.append(np.asarray(z))
            means.append(np.asarray(mean))
        z = np.concatenate(samples)
        std = float(np.std(z.astype(np.float64)))
        # A latent model may also be trained on the posterior means (first_stage.posterior):
        # their std differs where the encoder leaves a channel's variance unregularised.
        mode_std = float(np.std(np.concatenate(means).astype(np.float64)))
        record.update(scale=1.0 / std, std=std, mode_scale=1.0 / mode_std, mode_std=mode_std,
                      num_images=n, latent_shape=list(z.shape[1:]))
    if is_main:
        path = os.path.join(workdir, LATENT_SCALE_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=2)
        os.replace(path + ".tmp", path)
    return (f"latent scale {record['scale']:.5f} (posterior means: {record['mode_scale']:.5f}; "
            f"{lat.scale}) written to {LATENT_SCALE_FILE}")


def abstract_state(config):
    """(model, the train state as ShapeDtypeStructs) of an autoencoder config."""
    model, disc = build_model(config), build_discriminator(config)
    tx, disc_tx, _ = _optimizers(config)
    return model, jax.eval_shape(init_fn(config, model, disc, tx, disc_tx),
                                 jax.random.PRNGKey(0))


def restore_for_use(workdir, config, step, use_ema):
    """(model, params, model_state, step) of a checkpoint; only those parts are read."""
    model, abstract = abstract_state(config)
    mesh = parallel.make_mesh()
    place = lambda tree: abstract_with_sharding(tree, parallel.state_sharding(mesh, tree))
    ckpt = Checkpointer(workdir, async_save=False, read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step not in ckpt.manager.all_steps():
        raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt.directory}; choose "
                                f"--step from {sorted(ckpt.manager.all_steps())}")
    which = "ema_params" if use_ema and abstract.ema_params is not None else "params"
    params = ckpt.restore_subtree(which, place(abstract.params), step)
    model_state = (ckpt.restore_subtree("model_state", place(abstract.model_state), step)
                   if abstract.model_state else {})
    ckpt.close()
    return model, params, model_state, step


def image_maker(config, mesh, lpips_path: str | None = None, workdir: str | None = None):
    """Evaluation reconstructs held-out images; LPIPS is measured when weights are given (the
    path, else the config's loss.lpips_path)."""
    from ldm_jax.evaluation.evaluator import ImageMaker
    reconstruct = _reconstruct_fn(build_model(config))
    lpips_fn = None
    path = lpips_path or config.loss.lpips_path
    if path:
        from ldm_jax.convert.lpips_weights import load_converted
        from ldm_jax.models.lpips import LPIPS
        lpips_params = load_converted(os.path.expanduser(path))
        apply = jax.jit(lambda x, y: LPIPS().apply({"params": lpips_params}, x, y))
        lpips_fn = lambda x, y: apply(jnp.asarray(x), jnp.asarray(y))
    return ImageMaker("reconstructions", lambda bundle, x: reconstruct(*bundle, x),
                      lpips=lpips_fn)


def load_for_evaluation(workdir: str, config, mesh, step=None, use_ema: bool = True):
    """((params, model_state), step) of a checkpoint, for image_maker's make."""
    _, params, model_state, step = restore_for_use(workdir, config, step, use_ema)
    return (params, model_state), step


def sample(workdir: str, config, options: dict) -> str:
    """sample.py for an autoencoder workdir: --reconstruct (pairs + PSNR/SSIM) or
    --latent_scale (recompute latent_scale.json)."""
    if options.get("latent_scale"):
        model, params, model_state, step = restore_for_use(workdir, config, options["step"],
                                                            not options["raw_params"])
        source = pipeline.load_source(config.data, split="train")
        return write_latent_scale(config, model, params, model_state, workdir, step, source,
                                  True)
    if not options.get("reconstruct"):
        raise ConfigError("this workdir holds an autoencoder: pass --reconstruct (input | "
                          "reconstruction pairs with PSNR/SSIM) or --latent_scale")
    num = 16 if options["num"] is None else options["num"]
    if num < 1:
        raise ConfigError(f"--num={num}: ask for at least one image")
    out = options["out"]
    if out is not None:
        from ldm_jax.utils.image_grid import check_output_path
        check_output_path(out)
    model, params, model_state, step = restore_for_use(workdir, config, options["step"],
                                                        not options["raw_params"])
    x = held_out_images(config, num, options["split"])
    start = time.time()
    xrec = jax.device_get(_reconstruct_fn(model)(params, model_state, x))
    seconds = time.time() - start
    scores = image_quality(x, xrec)
    out = out or os.path.join(workdir, "samples", f"reconstruct_step{step}_{options['split']}.png")
    path = save_pairs(x, xrec, out)
    return (f"wrote {path} ({num} {options['split']} images | reconstructions, {seconds:.1f}s): "
            f"PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f}")
