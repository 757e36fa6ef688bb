"""Stable Diffusion v1's own training recipe, as its model card and the CompVis v1 configs
describe it, for a run from scratch at scale. Three stages, each a workdir:

  256   237k steps at 256x256 (sd-v1-1's first stage; LAION-2B-en)
  512   194k steps at 512x512, initialised from the 256 stage (laion-high-resolution)
  cfg   515k steps at 512x512 from the 512 stage, with 10% of the text dropped for
        classifier-free guidance (sd-v1-2 onwards; LAION aesthetics >= 5)
COMMAND: python train.py --config=configs/sd_v1_pretrain.py:256 --workdir=workdirs/sd_256
         python train.py --config=configs/sd_v1_pretrain.py:512 --workdir=workdirs/sd_512 \
             --config.training.init_from=workdirs/sd_256
AdamW at 1e-4, warmed up linearly over 10,000 steps, then constant; global batch 2048 = 2 per
device x 2 accumulation steps x 256 devices; EMA 0.9999. The VAE and CLIP text encoder are the
converted ones (first_stage.workdir, text_encoder.pretrained); the data source is yours to set.
"""
from configs import sd_v1

STAGES = {"256": (256, 237_000, 0.0), "512": (512, 194_000, 0.0), "cfg": (512, 515_000, 0.1)}


def get_config(stage: str = "256"):
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: choose one of {sorted(STAGES)} "
                         "(--config=configs/sd_v1_pretrain.py:256)")
    size, steps, p_uncond = STAGES[stage]
    config = sd_v1.get_config()
    config.first_stage.workdir = "workdirs/sd_v1/vae"
    config.text_encoder.pretrained = "workdirs/sd_v1/text_encoder"
    config.data.image_size = size
    config.conditioning.p_uncond = p_uncond

    config.optimizer.lr = 1e-4
    config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
    config.optimizer.weight_decay = 0.01  # AdamW (torch's default decay)
    config.optimizer.warmup_steps = 10_000
    config.optimizer.schedule = "constant"
    config.optimizer.grad_clip = 0.0
    config.optimizer.grad_accum_steps = 2
    config.training.batch_size = 2048
    config.training.num_steps = steps
    # ~10,000-step window, reached after ~90,000 steps of the compvis warm-up (before that
    # the EMA averages the last ~n/10 steps).
    config.training.ema_decay = 0.9999
    config.training.compute_dtype = "bfloat16"
    config.training.checkpoint_every = 5000
    config.training.sample_every = 5000
    config.training.num_samples = 16
    config.sampling.use_ema = True
    # Guidance needs the unconditional model the cfg stage trains.
    config.sampling.guidance_scale = 7.5 if p_uncond else 1.0
    return config
