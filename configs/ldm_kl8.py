"""Text-to-image latent diffusion on the embedded shapes dataset: the main job.

COMMAND: python train.py --config=configs/autoencoder_kl_f8_shapes.py   # the first stage
         python train.py --config=configs/ldm_kl8.py
         python sample.py --workdir=workdirs/ldm_kl8 --split=test
         python -m ldm_jax.evaluate --workdir=workdirs/ldm_kl8 --metrics=adherence --num=400
The U-Net works on the 4x4x4 latents of the frozen KL-f8 autoencoder (first_stage.workdir,
trained by the first command) of 32x32 one-object scenes, and cross-attends to the caption,
encoded by a small transformer trained with it from a word vocabulary of the training
captions. 10% of the captions are replaced by the empty one, so sampling can use
classifier-free guidance. `bash scripts/demo.sh` runs all four commands; its figures and an
ablation of this recipe are in the README ("The embedded demo").

One object per scene (data.max_objects=1) is the demo's easier task: the held-out colour-shape
pairs of the test split and the checker are those of the two-object data.
"""
from configs import ldm_base


def get_config():
    config = ldm_base.get_config()
    config.data.name = "shapes"
    config.data.image_size = 32
    config.data.max_objects = 1
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

    # Min-SNR-5 weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    # Weighting Strategy"): the low-noise steps, which only polish detail, stop dominating the
    # loss, so what the caption decides (colour, place, size) is learned sooner.
    config.diffusion.loss_weighting = "min_snr"
    config.diffusion.snr_gamma = 5.0

    config.optimizer.lr = 5e-4
    config.optimizer.warmup_steps = 100
    config.optimizer.schedule = "cosine"

    config.training.batch_size = 64
    # The demo's whole run takes 12.7 min on 2 cores with 1000 steps; its 500- and 1000-step
    # checkpoints read colour 0.56 -> 0.67 and size 0.59 -> 0.86, so more steps still pay.
    config.training.num_steps = 1000
    # With the default compvis warm-up the decay is min(0.999, (1+n)/(10+n)): 0.991 at the
    # last step, so the EMA averages about the last 100 steps.
    config.training.ema_decay = 0.999
    config.training.log_every = 50
    config.training.checkpoint_every = 500
    config.training.sample_every = 500
    config.training.num_samples = 16

    config.sampling.sampler = "dpmpp_2m"
    config.sampling.num_steps = 25
    config.sampling.guidance_scale = 3.0  # 5 read worse on every attribute (README ablation)
    return config
