"""CompVis single-file key layout <-> diffusers layout. Tiny random diffusers/transformers
models are exported with diffusers_to_compvis and read back by diffusers' own single-file
converters, which proves the CompVis names are the real ones; our reader must agree."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.loaders import single_file_utils as ref  # noqa: E402

from ldm_jax.convert import compvis_keys as ck  # noqa: E402
from ldm_jax.convert.compvis_unet_keys import infer_unet_config  # noqa: E402

UNETS = {
    # SD v1: 8 heads, 768-wide context, 1x1-conv projections, no attention at the last level.
    "v1": dict(in_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
               attention_head_dim=8),
    # SD v2 (inpainting-like input): 64-channel heads per level, linear projections, depth 2.
    "v2": dict(in_channels=9, block_out_channels=(64, 64, 128), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=64, attention_head_dim=(1, 1, 2), use_linear_projection=True,
               transformer_layers_per_block=2),
}
VAES = {"v1": dict(block_out_channels=(32, 64), layers_per_block=1),
        "v2": dict(block_out_channels=(32, 32, 64), layers_per_block=2)}
TEXTS = {"v1": ("clip", dict(num_hidden_layers=2, hidden_act="quick_gelu")),
         "v2": ("open_clip", dict(num_hidden_layers=3, hidden_act="gelu"))}
UNET_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
               "down_block_types", "up_block_types", "cross_attention_dim", "attention_head_dim",
               "use_linear_projection", "transformer_layers_per_block")
VAE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
              "latent_channels", "down_block_types", "up_block_types")
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", "hidden_act")


def _numpy(model, seed):
    """The model's state dict as numpy, with every tensor random so a misplaced one shows."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen).numpy() for k, v in model.state_dict().items()}


def _with_text_prefix(k):
    return k if k.startswith("text_model.") else "text_model." + k


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


@pytest.fixture(scope="module", params=["v1", "v2"])
def sd(request):
    """Tiny diffusers parts of one SD generation, their configs and their CompVis export."""
    v = request.param
    levels = len(VAES[v]["block_out_channels"])
    unet = diffusers.UNet2DConditionModel(sample_size=8, **UNETS[v])
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                  up_block_types=("UpDecoderBlock2D",) * levels,
                                  latent_channels=4, **VAES[v])
    kind, text_kw = TEXTS[v]
    text_cfg = transformers.CLIPTextConfig(vocab_size=99, hidden_size=128, intermediate_size=256,
                                           num_attention_heads=2, max_position_embeddings=16,
                                           bos_token_id=0, eos_token_id=2, **text_kw)
    text = transformers.CLIPTextModel(text_cfg)
    # Published SD folders (and diffusers' converters) name text weights text_model.*;
    # transformers 5's CLIPTextModel itself drops that level.
    text_sd = {_with_text_prefix(k): a for k, a in _numpy(text, 2).items()}
    parts = {"unet": _numpy(unet, 0), "vae": _numpy(vae, 1), "text_encoder": text_sd}
    configs = {"unet": dict(unet.config), "vae": dict(vae.config),
               "text_encoder": text_cfg.to_dict(), "text_kind": kind}
    # What real files also hold: schedule buffers, and OpenCLIP's unused contrastive head.
    extras = {"betas": np.linspace(1e-4, 2e-2, 10, dtype=np.float32)}
    if kind == "open_clip":
        extras["cond_stage_model.model.text_projection"] = np.ones((128, 32), np.float32)
        extras["cond_stage_model.model.logit_scale"] = np.float32(4.6)
    compvis = ck.diffusers_to_compvis(parts["unet"], parts["vae"], parts["text_encoder"],
                                      configs, extras=extras)
    return dict(v=v, kind=kind, parts=parts, configs=configs, compvis=compvis, text=text)


def _same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k, a in want.items():
        g = got[k].numpy() if hasattr(got[k], "numpy") else got[k]
        assert g.shape == a.shape and np.array_equal(g, a), k


def _torch(d: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(a)) for k, a in d.items()}


def test_compvis_layout_is_the_one_diffusers_reads(sd):
    cv, cfg = _torch(sd["compvis"]), sd["configs"]
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                             "betas")) for k in cv)
    _same(ref.convert_ldm_unet_checkpoint(cv, cfg["unet"]), sd["parts"]["unet"])
    _same(ref.convert_ldm_vae_checkpoint(cv, cfg["vae"]), sd["parts"]["vae"])
    if sd["kind"] == "clip":
        text = ref.convert_ldm_clip_checkpoint(cv)
    else:
        text = ref.convert_open_clip_checkpoint(sd["text"], cv)
    _same(text, sd["parts"]["text_encoder"])


def test_real_layout_details(sd):
    cv = sd["compvis"]
    # CompVis' VAE attention is 1x1 convs; SD v1's U-Net projections too, SD v2's are Linear.
    assert cv["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert cv["model.diffusion_model.middle_block.1.proj_in.weight"].ndim == (
        2 if sd["v"] == "v2" else 4)
    if sd["kind"] == "open_clip":
        assert cv["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (
            3 * 128, 128)
        assert cv["cond_stage_model.model.positional_embedding"].shape == (16, 128)


def test_compvis_to_diffusers_inverts(sd):
    out = ck.compvis_to_diffusers(sd["compvis"], sd["configs"])
    for name in ("unet", "vae", "text_encoder"):
        _same(out[name], sd["parts"][name])
    # A Lightning .ckpt wraps the tensors; configs inferred when not given.
    wrapped = ck.compvis_to_diffusers({"state_dict": sd["compvis"], "global_step": 7})
    _same(wrapped["unet"], sd["parts"]["unet"])


def test_infer_configs_recovers_the_architecture(sd):
    got, want = ck.infer_sd_configs(sd["compvis"]), sd["configs"]
    assert got["text_kind"] == sd["kind"]
    assert got["text_output"] == ("last" if sd["kind"] == "clip" else "penultimate")
    for part, fields in (("unet", UNET_FIELDS), ("vae", VAE_FIELDS),
                         ("text_encoder", TEXT_FIELDS)):
        for f in fields:
            assert _plain(got[part][f]) == _plain(want[part][f]), (part, f)
    # The inferred configs build models that take the converted weights strictly.
    parts = _torch_parts(ck.compvis_to_diffusers(sd["compvis"], got))
    unet_cfg = {k: v for k, v in got["unet"].items() if not k.startswith("_")}
    diffusers.UNet2DConditionModel(**unet_cfg).load_state_dict(parts["unet"], strict=True)
    vae_cfg = {k: v for k, v in got["vae"].items() if not k.startswith("_")}
    diffusers.AutoencoderKL(**vae_cfg).load_state_dict(parts["vae"], strict=True)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**got["text_encoder"]))
    want = set(text.state_dict())
    text.load_state_dict({k if k in want else k[len("text_model."):]: a
                          for k, a in parts["text_encoder"].items()}, strict=True)


def _torch_parts(parts):
    return {k: _torch(v) for k, v in parts.items()}


def test_ema_weights_are_chosen(sd):
    cv = dict(sd["compvis"])
    unet_keys = [k for k in cv if k.startswith("model.diffusion_model.")]
    # LitEma's naming: 'model.' dropped, the remaining dots deleted.
    ema = {"model_ema." + "".join(k.split(".")[1:]): cv[k] + 1.0 for k in unet_keys}
    cv.update(ema)
    cv.update({"model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int32(5)})
    want_ema = {k: a + 1.0 for k, a in sd["parts"]["unet"].items()}
    _same(ck.compvis_to_diffusers(cv, sd["configs"])["unet"], want_ema)
    _same(ck.compvis_to_diffusers(cv, sd["configs"], use_ema=False)["unet"], sd["parts"]["unet"])
    assert len(ema) > 100  # diffusers' converter only looks for EMA weights above that count
    _same(ref.convert_ldm_unet_checkpoint(_torch(cv), sd["configs"]["unet"], extract_ema=True),
          want_ema)
    split = ck.split_compvis(cv)
    assert split["used_ema"] and "model_ema.decay" in split["ignored"] and not split["unknown"]

    partial = dict(cv)
    del partial["model_ema.diffusion_modelout2weight"]
    with pytest.raises(ValueError, match=r"model\.diffusion_model\.out\.2\.weight.*use_ema=False"):
        ck.compvis_to_diffusers(partial, sd["configs"])
    _same(ck.compvis_to_diffusers(partial, sd["configs"], use_ema=False)["unet"],
          sd["parts"]["unet"])


def test_mismatches_name_keys_and_architecture(sd):
    cv, cfg = dict(sd["compvis"]), sd["configs"]
    missing = dict(cv)
    del missing["model.diffusion_model.middle_block.1.proj_out.bias"]
    with pytest.raises(ValueError, match=r"missing keys.*middle_block\.1\.proj_out\.bias") as e:
        ck.compvis_to_diffusers(missing, cfg)
    assert "block_out_channels" in str(e.value) and "\n" not in str(e.value)

    extra = {**cv, "model.diffusion_model.label_emb.0.0.weight": np.zeros((4, 4), np.float32)}
    with pytest.raises(ValueError, match=r"assumed SD U-Net.*unexpected keys.*label_emb"):
        ck.compvis_to_diffusers(extra, cfg)
    vae_extra = {**cv, "first_stage_model.loss.logvar": np.zeros((), np.float32)}
    with pytest.raises(ValueError, match=r"first_stage_model\.\*.*AutoencoderKL.*loss\.logvar"):
        ck.compvis_to_diffusers(vae_extra, cfg)
    stray = {**cv, "control_model.zero.weight": np.zeros((1,), np.float32)}
    with pytest.raises(ValueError, match="belong to no SD part.*control_model"):
        ck.compvis_to_diffusers(stray, cfg)

    parts = sd["parts"]
    text = {k: a for k, a in parts["text_encoder"].items() if "layers.1.mlp.fc2.bias" not in k}
    with pytest.raises(ValueError, match=r"diffusers text_encoder.*missing.*layers\.1\.mlp\.fc2"):
        ck.diffusers_to_compvis(parts["unet"], parts["vae"], text, cfg)


def test_not_a_stable_diffusion_file():
    with pytest.raises(ValueError, match=r"^not a Stable Diffusion checkpoint[^\n]*$"):
        ck.split_compvis({"encoder.conv_in.weight": np.zeros((1,))})
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint"):
        ck.infer_sd_configs({"state_dict": {"first_stage_model.x": np.zeros((1,))}})


def test_head_count_guesses():
    """Heads are not in the weights: 8 for a 768-wide context (SD v1, checked above), else
    64-channel heads, else one head; a caller can say."""
    z = np.zeros
    sd = {"input_blocks.0.0.weight": z((96, 4, 3, 3)), "out.2.weight": z((4, 96, 3, 3)),
          "input_blocks.1.0.out_layers.3.weight": z((96, 96, 3, 3)),
          "middle_block.1.proj_in.weight": z((96, 96)),
          "middle_block.1.transformer_blocks.0.attn2.to_k.weight": z((96, 1024))}
    assert infer_unet_config(sd)["attention_head_dim"] == [1]  # 96 is no multiple of 64
    assert infer_unet_config(sd, attention_head_dim=3)["attention_head_dim"] == 3
