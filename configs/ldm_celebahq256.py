"""Unconditional CelebA-HQ 256x256 latent diffusion with the LDM paper's model shapes
(CompVis celebahq-ldm-vq-4: 64x64x3 VQ-f4 latents), for users who have CelebA-HQ in tfds.

COMMAND: tfds build celeb_a_hq/256 --file_format=array_record --data_dir=DATA   # once, manual files
         python train.py --config=configs/autoencoder_vq_f4.py \
             --config.data.name=tfds --config.data.tfds_name=celeb_a_hq/256 --config.data.data_dir=DATA
         python train.py --config=configs/ldm_celebahq256.py --config.data.data_dir=DATA
U-Net: 224 channels, mult (1, 2, 3, 4), 2 res blocks, self-attention with 32-channel heads at
32x32, 16x16 and 8x8; betas LDM's "linear" 0.0015 -> 0.0195, eps-prediction, AdamW at LDM's
base rate 2e-6 times the batch of 48, EMA 0.9999.
"""
from configs import ldm_base


def get_config():
    config = ldm_base.get_config()
    config.data.name = "tfds"
    config.data.tfds_name = "celeb_a_hq/256"
    config.data.image_key = "image"
    config.data.label_key = ""
    config.data.image_size = 256
    config.data.random_flip = True

    config.first_stage.workdir = "workdirs/autoencoder_vq_f4"
    config.first_stage.config = "configs/autoencoder_vq_f4.py"
    config.first_stage.latent_channels = 3

    config.model.base_channels = 224
    config.model.channel_mult = (1, 2, 3, 4)
    config.model.num_res_blocks = 2
    config.model.attention_levels = (1, 2, 3)
    config.model.head_dim = 32
    config.model.dropout = 0.0

    ldm_base.paper_recipe(config, base_lr=2e-6)
    config.sampling.num_steps = 200
    config.sampling.guidance_scale = 1.0
    return config
