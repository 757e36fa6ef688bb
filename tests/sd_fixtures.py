"""Tiny random Stable Diffusion models in the diffusers layout, built offline for the tests:
an SD1-like one (conv projections, 8 heads, quick_gelu CLIP, eps) and an SD2-like one
(linear projections, per-level heads, gelu CLIP, v-prediction). Every weight is perturbed so
that a transposed or swapped tensor cannot go unnoticed."""
from __future__ import annotations

import json
import os

import numpy as np

# A CLIP-format BPE vocabulary: the 256 byte symbols, each also as a word end ("</w>"), a few
# merges, and the two special tokens (ids as in CLIP: specials last).
_MERGES = [("a", "n"), ("t", "h"), ("th", "e</w>"), ("an", "d</w>"), ("o", "n</w>"),
           ("r", "e"), ("e", "d</w>"), ("c", "i"), ("ci", "r"), ("l", "e</w>")]


def _byte_symbols():
    """CLIP's printable stand-ins for the 256 byte values (GPT-2's byte-to-unicode table)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    symbols, extra = [], 0
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def write_clip_tokenizer(folder: str, pad_token: str = "<|endoftext|>") -> int:
    """vocab.json, merges.txt and the special-token files of a diffusers tokenizer/ folder;
    returns the vocabulary size."""
    os.makedirs(folder, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "pad_token": pad_token}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({**specials, "model_max_length": 77,
                   "tokenizer_class": "CLIPTokenizer"}, f)
    return len(vocab)


def _perturb(module, torch, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module.eval()


def tiny_components(kind: str = "sd1", tokenizer_dir: str | None = None):
    """{unet, vae, text_encoder, tokenizer, scheduler} for diffusers' StableDiffusionPipeline."""
    import diffusers
    import torch
    import transformers
    v2 = kind == "sd2"
    width = 32
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        cross_attention_dim=width, attention_head_dim=(2, 4) if v2 else 8,
        use_linear_projection=v2)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=16)
    vocab_size = write_clip_tokenizer(tokenizer_dir, "!" if v2 else "<|endoftext|>")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77,
        hidden_act="gelu" if v2 else "quick_gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=1 if v2 else vocab_size - 1))
    tokenizer = transformers.CLIPTokenizer(os.path.join(tokenizer_dir, "vocab.json"),
                                           os.path.join(tokenizer_dir, "merges.txt"),
                                           model_max_length=77,
                                           pad_token="!" if v2 else "<|endoftext|>")
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if v2 else "epsilon")
    return {"unet": _perturb(unet, torch, 0), "vae": _perturb(vae, torch, 1),
            "text_encoder": _perturb(text, torch, 2), "tokenizer": tokenizer,
            "scheduler": scheduler}


def tiny_sd_pipeline(folder: str, kind: str = "sd1"):
    """A diffusers StableDiffusionPipeline of tiny random parts, saved to `folder` (safetensors);
    returns the pipeline."""
    import shutil
    import tempfile

    import diffusers
    with tempfile.TemporaryDirectory() as vocab_dir:
        parts = tiny_components(kind, vocab_dir)
        pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None,
                                                 feature_extractor=None,
                                                 requires_safety_checker=False)
        pipe.save_pretrained(folder, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; published SD folders carry CLIP's
        # vocab.json and merges.txt, as here.
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            shutil.copy(os.path.join(vocab_dir, name), os.path.join(folder, "tokenizer", name))
    return pipe


def random_latents(n: int, size: int = 8, channels: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, size, size, channels).astype(np.float32)
