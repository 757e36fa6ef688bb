"""Text-to-image latent diffusion on the embedded 64x64 shapes dataset: the main job.

COMMAND: python train.py --config=configs/autoencoder_kl_f8_shapes.py   # the first stage
         python train.py --config=configs/ldm_kl8.py
         python sample.py --workdir=workdirs/ldm_kl8 --split=test
The U-Net works on the 8x8x4 latents of the frozen KL-f8 autoencoder (first_stage.workdir,
trained by the first command) and cross-attends to the caption, encoded by a small
transformer trained with it from a word vocabulary of the training captions. 10% of the
captions are replaced by the empty one, so sampling can use classifier-free guidance.
Measured on 2 cores: 4.3M-parameter U-Net + 0.4M text encoder, ~90 img/s, 1500 steps in
9 min after the first stage's ~10 min. Samples then have the caption's background in
98-99% of cases and the right object count in about half; objects are coloured blobs at
roughly the right size (colour right in 11-12%, shape in 5-8%, grid cell in 1-6%), about the
same for held-out colour-shape pairs as for seen ones (200 samples, guidance 3, DPM-Solver++
25 steps). The first stage's blurry small objects (25.8 dB) bound what it can draw.
"""
from configs import ldm_base


def get_config():
    config = ldm_base.get_config()
    config.data.name = "shapes"
    config.data.image_size = 64
    config.data.num_train = 20000
    config.data.random_flip = False  # a flip would contradict "left"/"right" in the captions

    # Posterior samples, as LDM. An autoencoder that leaves a latent channel unregularised
    # (an earlier L1 recipe: posterior std ~9 there against means of std ~2, scale 1/79) makes
    # them mostly noise; first_stage.posterior="mode" then trains on the means instead.
    config.first_stage.posterior = "sample"

    config.conditioning.text = True
    config.text_encoder.max_length = 32
    config.text_encoder.width = 128
    config.text_encoder.depth = 2
    config.text_encoder.heads = 4

    config.model.base_channels = 64
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_levels = (0, 1)
    config.model.num_heads = 4
    config.model.dropout = 0.0

    config.optimizer.lr = 5e-4
    config.optimizer.warmup_steps = 100
    config.optimizer.schedule = "cosine"

    config.training.batch_size = 32
    config.training.num_steps = 1500
    config.training.ema_decay = 0.995
    config.training.log_every = 50
    config.training.checkpoint_every = 500
    config.training.sample_every = 500
    config.training.num_samples = 16

    config.sampling.sampler = "dpmpp_2m"
    config.sampling.num_steps = 25
    config.sampling.guidance_scale = 3.0
    return config
