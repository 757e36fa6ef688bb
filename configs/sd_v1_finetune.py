"""Fine-tune a converted Stable Diffusion v1 model: the U-Net trains, the VAE and the CLIP text
encoder stay frozen; captions are dropped 10% of the time so guidance keeps working.

COMMAND: python -m ldm_jax.convert SD_FOLDER workdirs/sd_v1            # once
         python train.py --config=configs/sd_v1_finetune.py:workdirs/sd_v1 \
             --workdir=workdirs/sd_v1_ft --config.data.image_size=512
The part after ':' is the converted model (default workdirs/sd_v1): the run takes its
architecture from that workdir's config.json, its U-Net weights (training.init_from), its VAE
(first_stage.workdir) and its text encoder (text_encoder.pretrained). The data are the
embedded shapes captions by default; bring your own with the data.* fields.
"""
import json
import os

from configs import sd_v1

# Fields the converted weights decide; everything else is this recipe's.
_FROM_MODEL = {"model": None, "text_encoder": None, "diffusion": None,
               "first_stage": ("latent_channels", "posterior"),
               "sampling": ("spacing", "steps_offset", "set_alpha_to_one"),
               "conditioning": ("concat",)}


def _take_architecture(config, model_dir: str):
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return config  # validated when training starts: init_from names the missing workdir
    with open(path) as f:
        saved = json.load(f)
    d = config.to_dict()
    for section, fields in _FROM_MODEL.items():
        for key, value in saved.get(section, {}).items():
            if fields is None or key in fields:
                d[section][key] = tuple(value) if isinstance(value, list) else value
    import ml_collections
    return ml_collections.ConfigDict(d)


def get_config(model_dir: str = "workdirs/sd_v1"):
    config = _take_architecture(sd_v1.get_config(), model_dir)
    config.training.init_from = model_dir
    config.first_stage.workdir = os.path.join(model_dir, "vae")
    config.text_encoder.pretrained = os.path.join(model_dir, "text_encoder")

    config.data.name = "shapes"
    config.data.image_size = 512
    config.data.num_train = 20000
    config.data.random_flip = False  # captions say left and right
    config.conditioning.p_uncond = 0.1

    config.optimizer.lr = 1e-5
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 500
    config.optimizer.schedule = "constant"
    config.optimizer.grad_clip = 1.0
    config.training.batch_size = 32
    config.training.num_steps = 10_000
    # The EMA starts from the loaded weights and its compvis warm-up from step 0: it averages
    # the last ~n/10 steps (decay 0.9991 at step 10,000) and would reach 0.9999 after ~90,000.
    config.training.ema_decay = 0.9999
    config.training.compute_dtype = "bfloat16"
    config.training.checkpoint_every = 1000
    config.training.sample_every = 1000
    config.training.num_samples = 8
    config.sampling.use_ema = True
    config.sampling.guidance_scale = 7.5
    return config
