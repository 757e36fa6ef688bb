"""sample.py, training-time grids and evaluation for latent-diffusion workdirs.

Tasks (chosen from the flags and the model):
  txt2img / class   --prompt (repeatable) or --prompt_file, --class; without them the
                    captions or labels of the first --num records of --split
  img2img           --init_image with --strength (no mask, no concat conditioning)
  inpaint           --init_image and --mask (white = repaint): the model's own mask
                    conditioning when it was trained with it, else blending
  super-resolution  a model trained with conditioning.concat=lowres: --init_image is the
                    low-resolution picture (image size / 4), else the --split images shrunk
Every PNG carries the prompt, negative prompt, class, seed, sampler, steps, guidance and
checkpoint step in its text chunks.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
import optax

from ldm_jax import parallel
from ldm_jax.config_checks import ConfigError
from ldm_jax.data import pipeline
from ldm_jax.models import concat_inputs
from ldm_jax.models.label_embedding import DROPPED
from ldm_jax.pipelines.latent import make_latent_sampler, sample_latent_images
from ldm_jax.stages import first_stage as first_stage_lib
from ldm_jax.stages import ldm_text
from ldm_jax.training import ldm_step
from ldm_jax.utils import image_grid


@dataclasses.dataclass
class Loaded:
    model: Any
    first: Any
    schedule: Any
    tok: Any
    params: Any
    step: int


def inside(workdir: str, path: str) -> str:
    """`path` as a workdir names its parts: relative paths that exist inside the workdir
    (converted models keep their VAE and text encoder there) are read from there."""
    if path and not os.path.isabs(path) and os.path.exists(os.path.join(workdir, path)):
        return os.path.join(workdir, path)
    return path


def workdir_record(workdir: str) -> dict:
    """The first_stage.json of a trained latent-diffusion workdir."""
    record = first_stage_lib.read_record(workdir)
    if record is None:
        raise FileNotFoundError(f"{os.path.join(workdir, first_stage_lib.RECORD_FILE)} is "
                                "missing: it names the first stage this model was trained on")
    return dict(record, workdir=inside(workdir, record["workdir"]))


def with_workdir_paths(config, workdir: str):
    """The config with a pretrained text encoder inside the workdir found there."""
    pretrained = config.text_encoder.pretrained
    if pretrained and inside(workdir, pretrained) != pretrained:
        config = config.copy_and_resolve_references()
        config.text_encoder.pretrained = inside(workdir, pretrained)
    return config


def load_workdir(workdir, config, mesh, step=None, use_ema=True) -> Loaded:
    """A trained latent-diffusion workdir: its first stage, tokenizer and params."""
    from ldm_jax import generate
    from ldm_jax.training.ldm_step import build_parts
    generate.check_trained(workdir)
    config = with_workdir_paths(config, workdir)
    first = first_stage_lib.load(config, mesh, workdir_record(workdir))
    tok = ldm_text.load_tokenizer(workdir) if config.conditioning.text else None
    module, fixed = _pretrained_text(config, mesh)
    model, schedule = build_parts(config, first, tok, module)
    shape = first_stage_lib.latent_shape(config, first, 1)
    abstract = jax.eval_shape(
        lambda k: ldm_step.init_state(config, model, optax.identity(), k, shape,
                                      frozen_text=bool(fixed)),
        jax.random.PRNGKey(0)).params
    params, step = generate.checkpoint_params(workdir, abstract, mesh, use_ema, step)
    return Loaded(model, first, schedule, tok, {**params, **fixed}, step)


def _pretrained_text(config, mesh):
    """(module, {"text_encoder": params}) of a frozen pretrained text encoder, or (None, {})."""
    if not (config.conditioning.text and config.text_encoder.pretrained):
        return None, {}
    module, params, _ = ldm_text.pretrained_encoder(config)
    return module, {"text_encoder": jax.device_put(params, parallel.replicated(mesh))}


def is_guided(config) -> bool:
    conditional = config.conditioning.text or bool(config.model.label_keys)
    return conditional and config.sampling.guidance_scale != 1.0


def conditions(config, tok, captions=None, labels=None, concat=None, negative=None,
               warn=None):
    """(cond, uncond) input dicts for `make_latent_sampler`."""
    cond, uncond = {}, {}
    if labels is not None:
        cond["labels"] = np.asarray(labels, np.int32)
        uncond["labels"] = np.full_like(cond["labels"], DROPPED)
    if tok is not None:
        n = len(captions)
        cond["ids"], cond["mask"] = ldm_text.encode_prompts(tok, captions, warn)
        neg = [negative or ""] * n
        uncond["ids"], uncond["mask"] = ldm_text.encode_prompts(tok, neg, warn if negative else None)
    if concat is not None:
        cond["concat"] = uncond["concat"] = np.asarray(concat, np.float32)
    return cond, uncond


def records_of(config, split: str, num: int):
    source = pipeline.load_source(config.data, split=pipeline.split_name(config.data, split))
    return [source[i % len(source)] for i in range(num)]


class GridWriter:
    """During training: training.num_samples images from the captions / labels of the
    held-out split (held-out colour-shape pairs included for shapes), as a captioned grid."""

    def __init__(self, config, model, first, schedule, mesh, workdir, is_main, tok, fixed=None):
        self.config, self.model, self.first, self.schedule = config, model, first, schedule
        self.mesh, self.workdir, self.is_main, self.tok = mesh, workdir, is_main, tok
        self.fixed = fixed or {}
        self.fn = None

    def __call__(self, state, step: int) -> list:
        c = self.config
        n = c.training.num_samples
        if self.fn is None:  # compiled on first use only
            self.fn = make_latent_sampler(self.model, self.first, self.schedule, c, n,
                                          self.mesh, is_guided(c))
            self.inputs = split_conditions(c, self.tok, self.first, "validation", n)
        cond, uncond, captions, _ = self.inputs
        params = {**(state.ema_params if c.sampling.use_ema else state.params), **self.fixed}
        images = sample_latent_images(self.fn, params, self.first.params, c.seed,
                                      c.sampling.num_steps, c.sampling.eta,
                                      c.sampling.guidance_scale, cond, uncond)
        if not self.is_main:
            return []
        path = os.path.join(self.workdir, "samples", f"step_{step:08d}.png")
        image_grid.save_captioned_grid(jax.device_get(images), path, captions)
        return [f"wrote {path}"]


def split_conditions(config, tok, first, split: str, num: int):
    """(cond, uncond, captions, originals) from the first `num` records of `split`; the
    originals (float images) feed concat conditioning."""
    records = records_of(config, split, num)
    keys = tuple(config.model.label_keys)
    labels = (np.stack([pipeline.stack_labels(r, keys) for r in records]) if keys else None)
    captions = [pipeline.caption_of(r) if "caption" in r else
                ", ".join(f"{k}={r[k]}" for k in keys) for r in records]
    images = None  # a latent cache's records have none; concat models never train on one
    if "image" in records[0]:
        images = np.stack([np.asarray(r["image"], np.float32) / 127.5 - 1.0 for r in records])
    concat = None
    kind = config.conditioning.concat
    if kind != "none":
        concat, _ = concat_condition(kind, first, images, default_mask(images.shape))
    cond, uncond = conditions(config, tok, captions if tok else None, labels, concat)
    return cond, uncond, captions, images


def default_mask(shape):
    """A centred box over half of each side: what inpainting repaints without --mask."""
    n, h, w, _ = shape
    mask = np.zeros((n, h, w, 1), np.float32)
    mask[:, h // 4: h - h // 4, w // 4: w - w // 4] = 1.0
    return mask


def concat_condition(kind, first, images, mask):
    """(concat input, what to show beside the sample) for concat-conditioned models.
    `images` are full-size originals; lowres models see them shrunk 4x."""
    import jax.numpy as jnp
    if kind == "lowres":
        low = concat_inputs.downsample(jnp.asarray(images))
        return np.asarray(concat_inputs.lowres_input(low, first.factor)), np.asarray(low)
    concat = ldm_step.inpaint_input(first, first.params, jnp.asarray(images), jnp.asarray(mask),
                                    jax.random.PRNGKey(0))
    return np.asarray(concat), np.asarray(concat_inputs.masked_images(images, mask))


def image_maker_for(config, mesh, model, first, schedule, tok):
    """Evaluation's ImageMaker: samples conditioned on the captions / labels of reference
    records."""
    from ldm_jax.data import shapes
    from ldm_jax.evaluation.evaluator import ImageMaker
    compiled = {}
    s = config.sampling
    keys = tuple(config.model.label_keys)

    def make(params, conds, n, seed):
        if n not in compiled:
            compiled[n] = make_latent_sampler(model, first, schedule, config, n, mesh,
                                              is_guided(config))
        cond, uncond = conds if conds is not None else ({}, {})
        return sample_latent_images(compiled[n], params, first.params, seed, s.num_steps,
                                    s.eta, s.guidance_scale, cond, uncond)

    def from_records(records):
        captions = [pipeline.caption_of(r) for r in records] if tok else None
        labels = np.stack([pipeline.stack_labels(r, keys) for r in records]) if keys else None
        return conditions(config, tok, captions, labels)

    # A caption names every attribute of the scene, so adherence reads all of them.
    conditioned = shapes.LABEL_KEYS if tok is not None else keys
    return ImageMaker("samples", make, label_keys=conditioned,
                      conditions=from_records if (tok is not None or keys) else None)


def image_maker(config, mesh, workdir: str):
    config = with_workdir_paths(config, workdir)
    first = first_stage_lib.load(config, mesh, workdir_record(workdir))
    tok = ldm_text.load_tokenizer(workdir) if config.conditioning.text else None
    module, _ = _pretrained_text(config, mesh)
    from ldm_jax.training.ldm_step import build_parts
    model, schedule = build_parts(config, first, tok, module)
    return image_maker_for(config, mesh, model, first, schedule, tok)


def read_image(path: str, size, flag: str, mask: bool = False) -> np.ndarray:
    """A picture file -> float (H, W, 3) in [-1, 1], or an (H, W, 1) 0/1 mask (white =
    repaint); `size` is H = W or (H, W)."""
    from PIL import Image, UnidentifiedImageError
    h, w = (size, size) if isinstance(size, int) else size
    try:
        with Image.open(path) as image:
            if mask:
                image = image.convert("L").resize((w, h), Image.NEAREST)
                return (np.asarray(image, np.float32)[..., None] > 127).astype(np.float32)
            image = image.convert("RGB").resize((w, h), Image.BICUBIC)
            return np.asarray(image, np.float32) / 127.5 - 1.0
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag}={path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"{flag}={path} is not a readable image ({e})") from None


def _cycle(values, num: int) -> list:
    return [values[i % len(values)] for i in range(num)]


def _task(config, options) -> str:
    kind = config.conditioning.concat
    if options.get("mask") and kind == "lowres":
        raise ConfigError("--mask: this model does super-resolution; drop the flag")
    if options.get("mask") and not options.get("init_image"):
        raise ConfigError("--mask needs --init_image, the picture to inpaint")
    if kind != "none":
        return kind  # the model's own conditioning; sampling starts from noise
    if options.get("mask"):
        return "inpaint"
    if options.get("init_image"):
        return "img2img"
    if options.get("strength") is not None:
        raise ConfigError("--strength needs --init_image (img2img)")
    return "generate"


def check_options(config, options, tok):
    if options.get("reconstruct") or options.get("latent_scale"):
        raise ConfigError("--reconstruct and --latent_scale are for autoencoder workdirs; this "
                          "one is a latent-diffusion model: drop the flag")
    if options.get("caption"):
        raise ConfigError("--caption is for label-conditioned pixel models; use --prompt")
    if (options.get("prompts") or options.get("negative_prompt")) and tok is None:
        raise ConfigError("--prompt / --negative_prompt: this model is not text-conditioned "
                          "(conditioning.text is False)")
    if options.get("classes") and not config.model.label_keys:
        raise ConfigError("--class: this model is not label-conditioned (model.label_keys is "
                          "empty)")
    if options.get("guidance") is not None:
        if not (tok is not None or config.model.label_keys):
            raise ConfigError(f"--guidance={options['guidance']}: this model is unconditional; "
                              "drop the flag")
        config.sampling.guidance_scale = options["guidance"]
    if options.get("sampler"):
        config.sampling.sampler = options["sampler"]
    steps = options.get("steps")
    if steps is not None and not 1 <= steps <= config.diffusion.num_timesteps:
        raise ConfigError(f"--steps={steps} must be between 1 and "
                          f"{config.diffusion.num_timesteps} (the training timesteps)")
    strength = options.get("strength")
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise ConfigError(f"--strength={strength} must be in [0, 1] (0 returns the image)")
    from ldm_jax.stages.ldm_checks import validate
    validate(config)


def image_count(options) -> int:
    prompts, classes = options.get("prompts") or [], options.get("classes") or []
    num = options.get("num")
    if num is None:
        num = max(len(prompts), len(classes)) if (prompts or classes) else 16
    if num < 1:
        raise ConfigError(f"--num={num}: ask for at least one image")
    return num


def sample_workdir(workdir: str, config, options: dict) -> str:
    """sample.py for a latent-diffusion workdir; returns the line it prints."""
    if options.get("out") is not None:
        image_grid.check_output_path(options["out"])
    tok_needed = config.conditioning.text
    check_options(config, options, object() if tok_needed else None)
    image_count(options)
    mesh = parallel.make_mesh()
    use_ema = config.sampling.use_ema if not options.get("raw_params") else False
    loaded = load_workdir(workdir, config, mesh, options.get("step"), use_ema)
    out = options.get("out") or os.path.join(
        workdir, "samples", f"sample_step{loaded.step}_seed{options['seed']}.png")
    return sample_loaded(config, loaded, mesh, options, out, os.path.abspath(workdir))


def _sizes(config, options, task) -> tuple:
    """(height, width) of the samples: --height/--width, default data.image_size."""
    h = options.get("height") or config.data.image_size
    w = options.get("width") or config.data.image_size
    if (h, w) != (config.data.image_size,) * 2 and task == "lowres":
        raise ConfigError("--height/--width: super-resolution models sample at their "
                          "training size; drop the flags")
    return h, w


def _check_sizes(config, first, h: int, w: int) -> None:
    step = first.factor * 2 ** (len(config.model.channel_mult) - 1)
    for name, value in (("--height", h), ("--width", w)):
        if value < step or value % step:
            raise ConfigError(f"{name}={value}: this model takes multiples of {step} (the first "
                              f"stage divides by {first.factor}, the U-Net by "
                              f"{step // first.factor}); try {max(step, value // step * step)}")


def sample_loaded(config, loaded, mesh, options: dict, out: str, source: str) -> str:
    """Sample a loaded latent-diffusion model as the options ask; returns the printed line."""
    from ldm_jax.data.conditioning import class_labels
    task = _task(config, options)
    prompts, classes = options.get("prompts") or [], options.get("classes") or []
    num = image_count(options)
    first, tok, s = loaded.first, loaded.tok, config.sampling
    height, width = _sizes(config, options, task)
    _check_sizes(config, first, height, width)
    size = config.data.image_size
    records = None
    if (tok is not None and not prompts) or (config.model.label_keys and not classes) \
            or (task != "generate" and not options.get("init_image")):
        records = records_of(config, options.get("split") or "train", num)
    captions = None
    if tok is not None:
        captions = _cycle(prompts, num) if prompts else [pipeline.caption_of(r) for r in records]
    labels, class_names = None, None
    if config.model.label_keys:
        if classes:
            labels, class_names = class_labels(config, _cycle(classes, num))
        else:
            keys = tuple(config.model.label_keys)
            labels = np.stack([pipeline.stack_labels(r, keys) for r in records])
            class_names = [", ".join(f"{k}={v}" for k, v in zip(keys, row)) for row in labels]
    # Pictures the task starts from (img2img, inpaint) or is conditioned on (concat models).
    originals = mask = concat = shown = None
    if task != "generate":
        if options.get("init_image"):
            low = size // concat_inputs.LOWRES_FACTOR
            in_size = (low, low) if task == "lowres" else (height, width)
            picture = read_image(options["init_image"], in_size, "--init_image")
            originals = np.repeat(picture[None], num, 0)
        else:
            if (height, width) != (size, size):
                raise ConfigError("--height/--width need --init_image for this task (the "
                                  f"dataset's images are {size}x{size})")
            originals = np.stack([np.asarray(r["image"], np.float32) / 127.5 - 1.0
                                  for r in records])
        if task == "inpaint":
            mask = (np.repeat(read_image(options["mask"], (height, width), "--mask",
                                         mask=True)[None], num, 0)
                    if options.get("mask") else default_mask(originals.shape))
    lines = []
    if task == "lowres":
        import jax.numpy as jnp
        low = (originals if options.get("init_image")
               else np.asarray(concat_inputs.downsample(jnp.asarray(originals))))
        concat, shown = np.asarray(concat_inputs.lowres_input(jnp.asarray(low), first.factor)), low
    elif task == "inpaint" and config.conditioning.concat == "inpaint":
        concat, shown = concat_condition("inpaint", first, originals, mask)
    elif task in ("inpaint", "img2img"):
        shown = originals if task == "img2img" else concat_inputs.masked_images(originals, mask)
    cond, uncond = conditions(config, tok, captions, labels, concat,
                              options.get("negative_prompt"), warn=lines.append)
    guided = is_guided(config)
    run_task = {"lowres": "generate", "inpaint": ("generate" if concat is not None
                                                  else "inpaint")}.get(task, task)
    fn = make_latent_sampler(loaded.model, first, loaded.schedule, config, num, mesh, guided,
                             run_task, size=(height, width))
    steps = options.get("steps") or s.num_steps
    eta = s.eta if options.get("eta") is None else options["eta"]
    strength = 0.8 if options.get("strength") is None else options["strength"]
    start = time.time()
    images = sample_latent_images(
        fn, loaded.params, first.params, options["seed"], steps, eta, s.guidance_scale, cond,
        uncond, images=originals if run_task != "generate" else None,
        strength=strength, mask=mask if run_task == "inpaint" else None)
    images = np.asarray(jax.device_get(images))
    seconds = time.time() - start
    common = {"seed": options["seed"], "sampler": s.sampler, "steps": steps,
              "guidance": s.guidance_scale, "checkpoint_step": loaded.step,
              "task": {"generate": "txt2img" if tok is not None else "generate",
                       "lowres": "super_resolution"}.get(task, task),
              "model": source}
    if task == "img2img":
        common["strength"] = strength
    if tok is not None:
        common["negative_prompt"] = options.get("negative_prompt") or ""
    per_image = []
    for i in range(num):
        meta = dict(common)
        if captions is not None:
            meta["prompt"] = captions[i]
        if class_names is not None:
            meta["class"] = class_names[i]
        per_image.append(meta)
    texts = [" | ".join(str(m[k]) for k in ("prompt", "class") if k in m) or f"seed {m['seed']}"
             for m in per_image]
    if shown is not None:  # the input beside each result
        images = np.concatenate([_as_size(shown, height), images], axis=2)
    if image_grid.is_folder_path(out):
        path = image_grid.save_images(images, out, captions=texts, metadata=per_image)
    else:
        meta = dict(common, prompts=[m.get("prompt") for m in per_image] if captions else None,
                    classes=class_names)
        path = image_grid.save_captioned_grid(images, out, texts,
                                              {k: v for k, v in meta.items() if v is not None})
    lines.append(f"wrote {path} ({num} images, {seconds:.1f}s)")
    return "\n".join(lines)


def _as_size(images, size: int) -> np.ndarray:
    """Pictures shown beside the samples, enlarged (nearest) to the sample size."""
    n, h = images.shape[:2]
    if h == size:
        return np.asarray(images)
    factor = size // h
    return np.repeat(np.repeat(np.asarray(images), factor, axis=1), factor, axis=2)
