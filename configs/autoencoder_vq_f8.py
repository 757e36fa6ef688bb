"""LDM's vq-f8 first stage (models/first_stage_models/vq-f8), trained with taming's
VQLPIPSWithDiscriminator: f=8, 16384 codes of dimension 4, attention at 32x32; 256x256 images
give 32x32x4 latents. The architecture is the released vq-f8 one; the loss settings are those of
the vq-f4 release.

COMMAND: python train.py --config=configs/autoencoder_vq_f8.py --workdir=workdirs/vq_f8 \
    --config.data.name=... --config.loss.lpips_path=lpips.safetensors
"""
from configs import autoencoder_base


def get_config():
    config = autoencoder_base.get_config()
    config.data.image_size = 256
    # Until real image sources land, the embedded shapes stand in (rendered at 256 px).
    config.data.num_train = 5000
    config.model.kind = "vq"
    config.model.z_channels = 4
    config.model.embed_dim = 4
    config.model.n_embed = 16384
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (32,)
    config.loss.disc_start = 0
    config.loss.disc_weight = 0.75
    config.loss.codebook_weight = 1.0
    config.latent.scale = "fixed"  # LDM feeds VQ latents to the U-Net unscaled
    config.latent.fixed_scale = 1.0
    return config
