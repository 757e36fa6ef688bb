"""Stable Diffusion from a diffusers folder: `load_pipeline` gives the images diffusers'
StableDiffusionPipeline gives for the same tiny random parts, initial latents, prompts and
scheduler (SD1-like eps and SD2-like v-prediction models), and its parts equal theirs."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import sd_fixtures  # noqa: E402

from ldm_jax import load_pipeline  # noqa: E402
from ldm_jax.config_checks import ConfigError  # noqa: E402

PROMPTS = ["a red circle and the green square", "then", ]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    reference = sd_fixtures.tiny_sd_pipeline(folder, request.param)
    return request.param, folder, reference, load_pipeline(folder)


def _reference_images(reference, latents, **kw):
    out = reference(latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                    output_type="np", **kw)
    return np.round(out.images * 255).astype(np.int32)


def test_txt2img_equals_diffusers(sd):
    kind, _, reference, pipe = sd
    latents = sd_fixtures.random_latents(len(PROMPTS), seed=3)
    ours = pipe(PROMPTS, num_steps=6, guidance_scale=7.5, sampler="ddim", latents=latents)
    ref = _reference_images(reference, latents, prompt=PROMPTS, num_inference_steps=6,
                            guidance_scale=7.5)
    assert ours.shape == ref.shape == (2, 16, 16, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int32) - ref)
    assert diff.max() <= 2, f"{kind}: max |diff| {diff.max()} of 255"
    assert ref.std() > 5  # a real picture, not a constant


def test_negative_prompt_equals_diffusers(sd):
    kind, _, reference, pipe = sd
    latents = sd_fixtures.random_latents(1, seed=4)
    ours = pipe(["the circle"], negative_prompt="red", num_steps=4, guidance_scale=5.0,
                latents=latents)
    ref = _reference_images(reference, latents, prompt=["the circle"], negative_prompt=["red"],
                            num_inference_steps=4, guidance_scale=5.0)
    plain = pipe(["the circle"], num_steps=4, guidance_scale=5.0, latents=latents)
    assert np.abs(ours.astype(np.int32) - ref).max() <= 2, kind
    assert np.abs(plain.astype(np.int32) - ref).max() > 2  # the negative prompt mattered


def test_parts_equal_diffusers(sd):
    kind, _, reference, pipe = sd
    ids = reference.tokenizer(PROMPTS, padding="max_length", max_length=77,
                              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx_ref = reference.text_encoder(ids)[0].numpy()
    ctx = pipe.encode_text(PROMPTS)
    np.testing.assert_allclose(ctx, ctx_ref, rtol=1e-4, atol=1e-4 * np.abs(ctx_ref).max())

    latents = sd_fixtures.random_latents(2, seed=5)
    with torch.no_grad():
        eps_ref = reference.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                                 torch.tensor([10, 700]),
                                 encoder_hidden_states=torch.from_numpy(ctx_ref)).sample
    eps = pipe.unet_apply(latents, np.array([10, 700]), ctx_ref)
    np.testing.assert_allclose(eps, eps_ref.numpy().transpose(0, 2, 3, 1), rtol=1e-4,
                               atol=1e-4 * float(eps_ref.abs().max()))

    scale = reference.vae.config.scaling_factor
    with torch.no_grad():
        img_ref = reference.vae.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))
                                       / scale).sample.numpy().transpose(0, 2, 3, 1)
        images = np.clip(img_ref, -1, 1)
        mean_ref = reference.vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))
                                        ).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(pipe.vae_decode(latents), img_ref, rtol=1e-4,
                               atol=1e-4 * np.abs(img_ref).max())
    np.testing.assert_allclose(pipe.vae_encode(images), mean_ref * scale, rtol=1e-4,
                               atol=1e-4 * np.abs(mean_ref * scale).max())


def test_bad_sizes_and_inputs_are_one_line_errors(sd):
    _, _, _, pipe = sd
    with pytest.raises(ConfigError, match="height=18: this model takes sizes that are "
                                          "multiples of 4"):
        pipe(["a"], height=18, num_steps=2)
    with pytest.raises(ConfigError, match="latents have shape"):
        pipe(["a"], latents=np.zeros((1, 4, 4, 4), np.float32), num_steps=2)
    with pytest.raises(ConfigError, match="sampler='nope'"):
        pipe(["a"], sampler="nope")


def test_other_sizes_and_batches_sample(sd):
    _, _, _, pipe = sd
    images = pipe(["a", "the", "re"], height=8, width=24, num_steps=2, sampler="dpmpp_2m",
                  seed=1)
    assert images.shape == (3, 8, 24, 3)


def test_incomplete_folder_is_named(tmp_path):
    os.makedirs(tmp_path / "unet")
    with pytest.raises(ConfigError, match="has no vae/, text_encoder/, tokenizer/, scheduler/"):
        load_pipeline(str(tmp_path))
