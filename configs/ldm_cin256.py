"""Class-conditional ImageNet 256x256 latent diffusion with the LDM paper's model shapes
(CompVis cin-ldm-vq-f8: 32x32x4 VQ-f8 latents), for users who have ImageNet in tfds.

COMMAND: tfds build imagenet2012 --file_format=array_record --data_dir=DATA   # once, manual files
         python train.py --config=configs/autoencoder_vq_f8.py \
             --config.data.name=tfds --config.data.tfds_name=imagenet2012 --config.data.data_dir=DATA
         python train.py --config=configs/ldm_cin256.py --config.data.data_dir=DATA
U-Net: 256 channels, mult (1, 2, 4), 2 res blocks, spatial transformers (depth 1, 32-channel
heads) at all three levels cross-attending to the class, which a ClassEmbedder turns into one
512-wide token. Betas LDM's "linear" 0.0015 -> 0.0195 (scaled_linear here), eps-prediction,
AdamW at LDM's base rate 1e-6 times the batch of 48, EMA 0.9999. Unlike the released
reference, 10% of the classes are dropped so that sampling can use guidance.
"""
from configs import ldm_base


def get_config():
    config = ldm_base.get_config()
    config.data.name = "tfds"
    config.data.tfds_name = "imagenet2012"
    config.data.image_key = "image"
    config.data.label_key = "label"
    config.data.num_classes = 1000
    config.data.image_size = 256
    config.data.random_flip = False

    config.first_stage.workdir = "workdirs/autoencoder_vq_f8"
    config.first_stage.config = "configs/autoencoder_vq_f8.py"
    config.first_stage.latent_channels = 4

    config.model.label_keys = ("label",)
    config.conditioning.class_context = True
    config.conditioning.class_embed_dim = 512
    config.conditioning.p_uncond = 0.1

    config.model.base_channels = 256
    config.model.channel_mult = (1, 2, 4)
    config.model.num_res_blocks = 2
    config.model.attention_levels = (0, 1, 2)
    config.model.head_dim = 32
    config.model.transformer_depth = 1
    config.model.dropout = 0.0

    ldm_base.paper_recipe(config, base_lr=1e-6)
    config.sampling.num_steps = 250
    config.sampling.guidance_scale = 1.5
    return config
