"""Stable Diffusion v1 (CompVis v1-inference.yaml): the architecture public SD 1.x weights load into.

COMMAND: python -m ldm_jax.convert SD_FOLDER_OR_CKPT workdirs/sd_v1   # weights -> a workdir
         python sample.py --workdir=workdirs/sd_v1 --prompt="a photograph of an astronaut"
   or:   python sample.py --pretrained=SD_FOLDER_OR_CKPT --prompt=...   # convert in memory
U-Net: 320 channels, mult (1, 2, 4, 4), 2 residual blocks per level, cross-attention at the
first three levels with 8 heads, context 768 (859,520,964 parameters). First stage: the KL-f8
VAE (configs/autoencoder_kl_f8_sd.py), latents scaled by 0.18215. Text: CLIP ViT-L/14's text
transformer (12 layers, width 768, 12 heads, quick_gelu, causal, 77 tokens), frozen, its last
hidden states attended to with the padding, as SD does. Scaled-linear betas 0.00085 -> 0.012,
eps-prediction; samplers use SD's "leading" timesteps with offset 1.

The converter fills first_stage.workdir and text_encoder.pretrained with the converted parts
(paths relative to the model's workdir).
"""
from configs import ldm_base


def get_config():
    config = ldm_base.get_config()
    # Sampling size, and the training size of fine-tuning runs (their data source is chosen
    # on the command line or in a derived config, e.g. configs/sd_v1_finetune.py).
    config.data.name = "tfds"
    config.data.image_size = 512
    config.data.random_flip = False

    config.first_stage.workdir = "vae"
    config.first_stage.config = "configs/autoencoder_kl_f8_sd.py"
    config.first_stage.latent_channels = 4

    config.conditioning.text = True
    config.conditioning.p_uncond = 0.1  # SD v1's released CFG stages dropped 10% of the text
    config.text_encoder.pretrained = "text_encoder"
    config.text_encoder.max_length = 77
    config.text_encoder.width = 768
    config.text_encoder.depth = 12
    config.text_encoder.heads = 12
    config.text_encoder.causal = True
    config.text_encoder.output = "last"
    config.text_encoder.use_mask = False

    m = config.model
    m.base_channels = 320
    m.channel_mult = (1, 2, 4, 4)
    m.num_res_blocks = 2
    m.attention_levels = (0, 1, 2)
    m.num_heads = 8
    m.head_dim = 0
    m.transformer_depth = 1
    m.use_linear_projection = False
    m.dropout = 0.0

    config.diffusion.schedule = "scaled_linear"
    config.diffusion.beta_start = 0.00085
    config.diffusion.beta_end = 0.012
    config.diffusion.parameterization = "eps"

    s = config.sampling
    s.sampler = "dpmpp_2m"
    s.num_steps = 30
    s.guidance_scale = 7.5
    s.spacing = "leading"
    s.steps_offset = 1
    s.set_alpha_to_one = False
    s.use_ema = False  # converted weights are stored once, as the params
    return config
