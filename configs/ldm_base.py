"""Fields shared by every latent-diffusion config; experiment configs start from this one.

A latent-diffusion run trains a U-Net on the latents of a frozen first stage (an autoencoder
workdir, `first_stage.workdir`), conditioned by text (a transformer encoder trained jointly,
cross-attention), by dataset labels (added to the time embedding), and/or by concatenated
inputs (a masked image for inpainting, a low-resolution image for super-resolution).
"""
from configs import ddpm_base


def get_config():
    config = ddpm_base.get_config()
    config.stage = "ldm"
    # LDM drops conditioning with conditioning.p_uncond instead.
    del config.training["label_drop_prob"]

    config.first_stage = dict(
        workdir="workdirs/autoencoder_kl_f8_shapes",  # a finished autoencoder run
        config="configs/autoencoder_kl_f8_shapes.py",  # how to train it (named in errors)
        latent_channels=4,      # must equal the autoencoder's latent channels
        use_ema=True,           # the autoencoder's EMA weights when it kept them
        posterior="sample",     # KL latents: a posterior sample (LDM) or its mean ("mode")
    )
    config.conditioning = dict(
        text=False,             # cross-attention to the encoded caption
        concat="none",          # none | inpaint (mask + masked-image latents) | lowres (4x SR)
        p_uncond=0.1,           # fraction trained with the empty caption / withheld labels
        inpaint_full_mask_prob=0.25,  # inpaint: fraction of training masks covering everything
        class_context=False,    # labels as cross-attention tokens (LDM's ClassEmbedder) instead
                                # of an embedding added to the time embedding
        class_embed_dim=512,    # class_context: token width (the U-Net's context width)
    )
    config.text_encoder = dict(
        max_length=32,          # tokens per caption, [BOS] and [EOS] included
        width=128,              # also the U-Net's context width
        depth=2,
        heads=4,
        causal=False,           # LDM's jointly trained encoder sees the whole caption
        pretrained="",          # a folder with a pretrained encoder (text_encoder_io), kept
                                # frozen; "": trained jointly from scratch
        output="last",          # last | penultimate: which hidden states the U-Net reads
        use_mask=True,          # False: padding tokens are attended to (Stable Diffusion)
    )
    # The LDM U-Net (SD v1's layout): attention at the levels listed in attention_levels,
    # cross-attending to the text when conditioning.text.
    config.model.attention_levels = (0, 1)
    config.model.transformer_depth = 1
    config.model.use_linear_projection = False
    config.model.norm_groups = 32

    # LDM's schedule ("linear" in its configs: scaled_linear here), eps-prediction.
    config.diffusion.schedule = "scaled_linear"
    config.diffusion.beta_start = 0.00085
    config.diffusion.beta_end = 0.012
    config.diffusion.parameterization = "eps"

    config.sampling.clip_denoised = False  # latents are not bounded like pixels
    config.sampling.sampler = "dpmpp_2m"
    config.sampling.num_steps = 25
    config.sampling.guidance_scale = 1.0
    return config


def paper_recipe(config, base_lr: float):
    """The LDM paper's 256x256 training settings (CompVis configs): "linear" betas 0.0015 ->
    0.0195, AdamW at base_lr times the batch of 48 (as its trainer scales it), no warm-up or
    clipping, EMA 0.9999; DDIM sampling."""
    config.diffusion.schedule = "scaled_linear"
    config.diffusion.beta_start = 0.0015
    config.diffusion.beta_end = 0.0195
    config.optimizer.lr = base_lr * 48
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 0
    config.optimizer.grad_clip = 0.0
    config.training.batch_size = 48
    config.training.num_steps = 500_000
    # ~10,000-step window, reached after ~90,000 steps of the compvis warm-up (before that
    # the EMA averages the last ~n/10 steps).
    config.training.ema_decay = 0.9999
    config.training.sample_every = 5000
    config.training.num_samples = 16
    config.sampling.sampler = "ddim"
    return config
