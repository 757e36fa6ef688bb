"""Fields shared by every first-stage (autoencoder) config; LDM's kl-f8 settings by default.

The loss follows latent-diffusion's LPIPSWithDiscriminator (KL) and taming's
VQLPIPSWithDiscriminator (VQ). Learning rates are the effective ones: LDM configs give a base
rate of 4.5e-6 that main.py multiplies by batch size x accumulation x GPUs.
"""
import ml_collections

from configs import data_sources, eval_base, parallel_fields


def get_config():
    config = ml_collections.ConfigDict()
    config.stage = "autoencoder"
    config.seed = 0

    config.data = dict(
        name="shapes",          # shapes (embedded) | cifar10 | tfds | folder | webdataset
        data_dir="",
        image_size=64,
        num_train=20000,
        max_objects=2,          # shapes only: objects per scene, 1 or 2 (1: an easier task)
        tfds_name="",           # name "tfds": any tfds dataset prepared in array_record format
        image_key="image",
        label_key="",           # unused by autoencoders
        num_classes=0,
        random_flip=False,
        num_threads=2,
        prefetch=4,
    )
    config.data.update(data_sources.source_fields())
    config.model = dict(
        kind="kl",              # kl (Gaussian posterior) | vq (vector-quantised)
        ch=128,
        ch_mult=(1, 2, 4, 4),   # downsampling factor f = 2 ** (len(ch_mult) - 1)
        num_res_blocks=2,
        attn_resolutions=(),    # resolutions with attention besides the middle block
        z_channels=4,
        embed_dim=4,            # vq: code dimension (kl uses z_channels)
        n_embed=16384,          # vq: codebook size
        vq_beta=0.25,           # vq: commitment weight
        vq_legacy=True,         # vq: taming's released weighting (beta on the codebook term)
        vq_ema=False,           # vq: EMA codebook updates instead of a codebook loss
        vq_ema_decay=0.99,
        vq_restart_dead_codes=False,  # vq_ema only: move unused codes onto encoder outputs
        dropout=0.0,
        norm_groups=32,
    )
    config.loss = dict(
        perceptual_weight=1.0,  # LPIPS; needs loss.lpips_path, else set 0
        lpips_path="",          # LPIPS weights converted with `python -m ldm_jax.convert.lpips_weights`
        pixel_loss="l1",        # l1 (LDM's KL and taming's VQ losses) | l2
        kl_weight=1e-6,
        codebook_weight=1.0,
        logvar_init=0.0,
        # The reference declares logvar a parameter but never gives it to an optimiser, so it
        # stays at logvar_init; True trains it with the autoencoder.
        learn_logvar=False,
        disc_start=50001,
        disc_weight=0.5,
        disc_factor=1.0,
        disc_loss="hinge",      # hinge | vanilla
        disc_layers=3,
        disc_channels=64,
        disc_norm="batch",      # batch | act
        disc_lr=0.0,            # 0: the autoencoder's optimizer.lr
    )
    config.optimizer = dict(
        lr=4.5e-6 * 12,         # LDM kl-f8: base 4.5e-6 x batch 12 (one GPU)
        b1=0.5,
        b2=0.9,
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        schedule="constant",
        grad_clip=0.0,
        grad_accum_steps=1,
    )
    config.training = dict(
        batch_size=12,
        num_steps=500_000,
        use_ema=False,
        # Averages ~1/(1-d) = 1000 steps once warmed up; with the compvis warm-up (see
        # ddpm_base) the decay is (1+n)/(10+n) until it reaches 0.999 after ~9,000 steps.
        ema_decay=0.999,
        ema_warmup="compvis",   # compvis | power | none
        ema_inv_gamma=1.0,      # power warm-up only
        ema_power=2 / 3,        # power warm-up only
        compute_dtype="float32",
        log_every=100,
        checkpoint_every=5000,
        keep_checkpoints=3,
        init_from="",           # a workdir whose weights (EMA when it samples with them) start
                                # this run; its optimiser state and step are not taken
        async_checkpointing=True,
        sample_every=5000,      # evaluation: PSNR/SSIM and an input|reconstruction PNG
        num_samples=16,         # held-out images per evaluation
        progress_bar=True,
        skip_nonfinite_steps=False,
    )
    config.latent = dict(
        scale="std",            # std: 1/std of latents over num_images (LDM's scale_by_std); fixed
        fixed_scale=0.18215,    # scale="fixed": Stable Diffusion's value
        num_images=256,
    )
    config.eval = eval_base.eval_section(("psnr", "ssim", "fid"))
    config.parallel = parallel_fields.parallel_section()
    config.eval.reference_split = "validation"  # the split reconstructed
    return config


def ldm_first_stage(kind: str, z_channels: int, ch_mult: tuple, attn_resolutions: tuple = (),
                    n_embed: int = 0):
    """One of LDM's released first stages at 256x256: ch 128, 2 res blocks, the given levels;
    the embedded shapes (5000 rendered at 256 px) stand in until real image sources land."""
    config = get_config()
    config.data.image_size = 256
    config.data.num_train = 5000
    config.model.kind = kind
    config.model.z_channels = z_channels
    config.model.embed_dim = z_channels
    config.model.ch = 128
    config.model.ch_mult = ch_mult
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = attn_resolutions
    if kind == "kl":  # latent-diffusion's LPIPSWithDiscriminator settings
        config.loss.disc_start = 50001
        config.loss.kl_weight = 1e-6
        config.loss.disc_weight = 0.5
    else:  # taming's VQLPIPSWithDiscriminator as LDM's vq-f4 release sets it
        config.model.n_embed = n_embed
        config.loss.disc_start = 0
        config.loss.disc_weight = 0.75
        config.loss.codebook_weight = 1.0
        config.latent.scale = "fixed"  # LDM feeds VQ latents to the U-Net unscaled
        config.latent.fixed_scale = 1.0
    return config
