"""Fields shared by every pixel-space DDPM config; experiment configs start from this one."""
import ml_collections

from configs import data_sources, eval_base, parallel_fields


def get_config():
    config = ml_collections.ConfigDict()
    config.stage = "ddpm"
    config.seed = 0

    config.data = dict(
        name="shapes",          # shapes (embedded) | cifar10 | tfds | folder | webdataset
        data_dir="",            # tfds data dir; "" means $TFDS_DATA_DIR or ~/tensorflow_datasets
        image_size=32,
        num_train=20000,        # shapes only: how many training images to generate
        max_objects=2,          # shapes only: objects per scene, 1 or 2 (1: an easier task)
        tfds_name="",           # name "tfds": any tfds dataset prepared in array_record format
        image_key="image",      # tfds: the image feature (centre-cropped, resized to image_size)
        label_key="label",      # tfds: the class feature, exposed as the label "label"
        num_classes=0,          # tfds: values of label_key; 0 reads its ClassLabel
        random_flip=True,
        num_threads=2,          # grain reader threads per process
        prefetch=4,             # batches prefetched per process
    )
    config.data.update(data_sources.source_fields())
    config.model = dict(
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_heads=1,
        head_dim=0,             # >0: heads = channels // head_dim (overrides num_heads)
        dropout=0.1,
        norm_groups=32,
        remat="none",           # none | full | save_dots, or per block: res=full,transformer=none
        attention="auto",       # auto | xla | cudnn | chunked (attention kernel)
        label_keys=(),          # dataset labels the U-Net is conditioned on; () = unconditional
    )
    config.diffusion = dict(
        schedule="linear",      # linear | scaled_linear | cosine
        num_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        parameterization="eps",  # eps | x0 | v
        loss_weighting="none",  # none | min_snr | truncated_snr
        snr_gamma=5.0,
        timestep_sampling="uniform",  # uniform | logit_normal (training t distribution)
        logit_mean=0.0,         # logit_normal only: t/T = sigmoid(N(logit_mean, logit_std^2))
        logit_std=1.0,
    )
    config.optimizer = dict(
        lr=2e-4,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=5000,
        schedule="constant",    # constant | cosine (after warm-up)
        grad_clip=1.0,          # global-norm clip; 0 disables
        grad_accum_steps=1,     # micro-batches per step (the batch is split, not multiplied)
    )
    config.training = dict(
        batch_size=128,         # global batch over all devices of all processes
        num_steps=800_000,
        # EMA of the weights, sampled with: a fixed decay d averages ~1/(1-d) steps. The
        # warm-up caps d early on so the EMA forgets the random init: compvis (CompVis LitEma)
        # uses (1+n)/(10+n) at update n, which averages ~n/10 steps and reaches 0.9999 after
        # ~90,000 steps; power (diffusers EMAModel) uses 1-(1+(n-1)/inv_gamma)**-power, which
        # reaches 0.9999 after 1e6 steps at power 2/3; none keeps d from the first step.
        ema_decay=0.9999,
        ema_warmup="compvis",   # compvis | power | none
        ema_inv_gamma=1.0,      # power warm-up only
        ema_power=2 / 3,        # power warm-up only; diffusers suggests 3/4 for short runs
        compute_dtype="float32",  # float32 | bfloat16 (params stay float32)
        log_every=100,
        checkpoint_every=5000,
        keep_checkpoints=3,
        init_from="",           # a workdir whose weights (EMA when it samples with them) start
                                # this run; its optimiser state and step are not taken
        async_checkpointing=True,
        sample_every=10_000,    # 0 disables sample grids during training
        num_samples=64,
        progress_bar=True,
        label_drop_prob=0.1,    # conditional models: fraction trained without labels (for guidance)
        skip_nonfinite_steps=False,  # True: a step with a NaN/Inf loss leaves the weights as they
                                     # were and is counted; False: the run stops at it
    )
    config.sampling = dict(
        sampler="ddim",         # ddpm | ddim | plms | dpmpp_2m | dpmpp_2m_sde | euler | euler_a
        num_steps=50,
        eta=0.0,
        spacing="leading",      # leading | trailing | linspace
        steps_offset=0,
        ddpm_variance="fixed_small",  # fixed_small | fixed_large
        clip_denoised=True,
        use_ema=True,
        guidance_scale=1.0,     # conditional models: classifier-free guidance; 1 = none
        guidance_rescale=0.0,   # 0..1: pull the guided output's std towards the conditional one's
        set_alpha_to_one=True,  # the last DDIM/PLMS step lands on alpha_bar = 1 (diffusers'
                                # set_alpha_to_one); False: on alpha_bar[0], as CompVis and SD do
    )
    config.eval = eval_base.eval_section(("fid",))
    config.parallel = parallel_fields.parallel_section()
    return config

