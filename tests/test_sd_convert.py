"""Stable Diffusion conversion: diffusers folder -> ldm-jax workdir -> diffusers folder holds
identical tensors; a CompVis single file (made from the folder, as .safetensors and as .ckpt)
loads to the same params; pickles never run code; damaged inputs are one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax  # noqa: E402
from flax import traverse_util  # noqa: E402

import sd_fixtures  # noqa: E402

from ldm_jax import load_pipeline  # noqa: E402
from ldm_jax.config_checks import ConfigError  # noqa: E402
from ldm_jax.convert import compvis_keys
from ldm_jax.stable_diffusion import read as stable_diffusion  # noqa: E402
from ldm_jax.stable_diffusion.convert_cli import main as convert_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd1"))
    sd_fixtures.tiny_sd_pipeline(folder, "sd1")
    return folder


@pytest.fixture(scope="module")
def converted(sd1, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("conv") / "workdir")
    assert convert_main([sd1, dst]) == 0
    return dst


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _assert_same_tree(a, b, what, any_heads=False):
    """Equal leaves; with `any_heads`, up to the head split of attention kernels ((in, heads,
    head_dim) in one, (in, heads', head_dim') in the other: the same matrix)."""
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys(), what
    for k in fa:
        x, y = (fa[k].reshape(-1), fb[k].reshape(-1)) if any_heads else (fa[k], fb[k])
        np.testing.assert_array_equal(x, y, err_msg=f"{what} {'/'.join(k)}")


def _safetensors(path):
    from safetensors.numpy import load_file
    return load_file(path)


def test_diffusers_workdir_diffusers_round_trip_is_identical(sd1, converted, tmp_path):
    out = str(tmp_path / "back")
    assert convert_main([converted, out, "--to_diffusers"]) == 0
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"),
                       ("vae", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "model.safetensors")):
        a, b = _safetensors(os.path.join(sd1, part, name)), _safetensors(os.path.join(out, part, name))
        # transformers 5 saves CLIPTextModel without the "text_model." level that published
        # SD folders (and so the export) have; both load into either version.
        a = {("text_model." + k if part == "text_encoder" and not k.startswith("text_model.")
              else k): v for k, v in a.items() if not k.endswith("position_ids")}
        assert sorted(a) == sorted(b), part
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{part} {k}")
    # The exported folder is a working diffusers pipeline with the same tokenizer.
    import diffusers
    import transformers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out)
    ref_tok = transformers.CLIPTokenizer.from_pretrained(os.path.join(sd1, "tokenizer"))
    prompt = ["a red circle, and the THEN-green square!"]
    assert pipe.tokenizer(prompt).input_ids == ref_tok(prompt).input_ids
    with open(os.path.join(out, "unet", "config.json")) as f:
        unet_cfg = json.load(f)
    with open(os.path.join(sd1, "unet", "config.json")) as f:
        src_cfg = json.load(f)
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim",
                "down_block_types", "up_block_types", "use_linear_projection"):
        assert unet_cfg[key] == src_cfg[key], key


def test_converted_workdir_samples_as_the_folder(sd1, converted):
    latents = sd_fixtures.random_latents(1, seed=7)
    kw = dict(num_steps=3, guidance_scale=4.0, latents=latents)
    a = load_pipeline(sd1)(["the circle"], **kw)
    b = load_pipeline(converted)(["the circle"], **kw)
    np.testing.assert_array_equal(a, b)


def test_workdir_parts_are_relative_so_it_can_move(converted, tmp_path):
    import shutil
    moved = str(tmp_path / "moved")
    shutil.copytree(converted, moved)
    with open(os.path.join(moved, "first_stage.json")) as f:
        assert json.load(f)["workdir"] == "vae"
    shutil.rmtree(converted + "_gone", ignore_errors=True)
    images = load_pipeline(moved)(["a"], num_steps=2, guidance_scale=1.0)
    assert images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_compvis_file_loads_to_the_same_params(sd1, tmp_path, fmt):
    ref = stable_diffusion.read_diffusers(sd1)
    parts = {p: stable_diffusion._part_weights(sd1, p, stems)
             for p, stems in (("unet", ("diffusion_pytorch_model",)),
                              ("vae", ("diffusion_pytorch_model",)),
                              ("text_encoder", ("model",)))}
    configs = {"unet": json.load(open(os.path.join(sd1, "unet", "config.json"))),
               "vae": json.load(open(os.path.join(sd1, "vae", "config.json"))),
               "text_encoder": json.load(open(os.path.join(sd1, "text_encoder", "config.json"))),
               "text_kind": "clip"}
    single = compvis_keys.diffusers_to_compvis(parts["unet"], parts["vae"],
                                               parts["text_encoder"], configs)
    path = str(tmp_path / f"model.{fmt}")
    if fmt == "safetensors":
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in single.items()}, path)
    else:
        torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in single.items()},
                    "global_step": 10}, path)
    got = stable_diffusion.read(path, tokenizer=os.path.join(sd1, "tokenizer"))
    # A single file does not record head counts: SD v1's 8 are assumed at context 768, one
    # per 64 channels otherwise, so this tiny U-Net (context 32) reads with other heads.
    _assert_same_tree(got.unet, ref.unet, "unet", any_heads=True)
    _assert_same_tree(got.vae, ref.vae, "vae")
    _assert_same_tree(got.text, ref.text, "text")
    assert got.config.diffusion.parameterization == "eps"
    assert got.config.text_encoder.output == "last" and got.latent_scale == 0.18215


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, sd1):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "boom": _Payload()},
               str(path))
    marker = os.path.join(os.getcwd(), "PWNED_BY_PICKLE")
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        stable_diffusion.read(str(path), tokenizer=os.path.join(sd1, "tokenizer"))
    assert not os.path.exists(marker)
    with open(path, "rb") as f:  # the file really carries the payload
        assert b"system" in f.read()


def test_damaged_inputs_are_one_line_errors(sd1, tmp_path):
    good = os.path.join(sd1, "unet", "diffusion_pytorch_model.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(good, "rb").read()[:1000])
    with pytest.raises(ConfigError, match="not a readable safetensors file, perhaps truncated"):
        stable_diffusion.read(str(cut), tokenizer=os.path.join(sd1, "tokenizer"))
    with pytest.raises(ConfigError, match="holds no tokenizer; pass --tokenizer"):
        stable_diffusion.read(str(cut))
    not_sd = tmp_path / "other.safetensors"
    from safetensors.numpy import save_file
    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(not_sd))
    with pytest.raises(ConfigError, match="not a Stable Diffusion checkpoint"):
        stable_diffusion.read(str(not_sd), tokenizer=os.path.join(sd1, "tokenizer"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stable_diffusion.read(str(tmp_path / "nothing"))


def test_convert_and_sample_from_the_command_line(sd1, tmp_path):
    """The README's commands: convert, then sample the workdir and the folder directly."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    dst = str(tmp_path / "wd")
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=str(tmp_path), env=env,
                                       capture_output=True, text=True, timeout=600)
    r = run("-m", "ldm_jax.convert", sd1, dst)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote" in r.stdout
    r = run(os.path.join(ROOT, "sample.py"), f"--workdir={dst}", "--prompt=the red circle",
            "--prompt=then", "--steps=2", "--guidance=3", "--sampler=ddim", "--height=16",
            "--width=24", f"--out={tmp_path}/imgs/")
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image
    with Image.open(tmp_path / "imgs" / "000001.png") as im:
        assert im.size == (24, 16)
    r = run(os.path.join(ROOT, "sample.py"), f"--pretrained={sd1}", "--prompt=a", "--steps=2",
            "--height=18")
    assert r.returncode == 2 and "--height=18: this model takes multiples of 4" in r.stderr
    # img2img straight from the diffusers folder: the picture beside the result.
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(tmp_path / "in.png")
    r = run(os.path.join(ROOT, "sample.py"), f"--pretrained={sd1}", "--prompt=the circle",
            f"--init_image={tmp_path}/in.png", "--strength=0.5", "--steps=4", "--num=1",
            f"--out={tmp_path}/i2i.png")
    assert r.returncode == 0, r.stderr[-2000:]
    with Image.open(tmp_path / "i2i.png") as im:
        assert im.size[0] >= 32 and im.size[1] >= 16  # [input | result], captioned
    r = run("-m", "ldm_jax.convert", sd1, dst)
    assert r.returncode == 2 and "exists and is not empty" in r.stderr


def test_finetune_starts_from_the_converted_weights(converted, shapes_data_dir, tmp_path):
    """configs/sd_v1_finetune.py on the shapes captions: the U-Net starts from the converted
    weights (unchanged after steps at lr 1e-12), trains in bf16, and the frozen parts stay out of its
    checkpoint."""
    from conftest import set_fields

    from configs import sd_v1_finetune
    from ldm_jax.stable_diffusion import load as latent_model
    from ldm_jax.training.loop import train

    def run(workdir, **fields):
        config = set_fields(sd_v1_finetune.get_config(converted), {
            "data.data_dir": shapes_data_dir, "data.image_size": 32, "data.num_train": 64,
            "training.batch_size": 8, "training.num_steps": 2, "training.log_every": 1,
            "training.checkpoint_every": 2, "training.sample_every": 0,
            "training.progress_bar": False, "optimizer.warmup_steps": 0, **fields})
        history = train(config, workdir)
        return latent_model.load(workdir, use_ema=False)[1].params, history

    start = latent_model.load(converted)[1].params
    # AdamW moves each weight by about lr per step: at 1e-12 the start shows through.
    same, _ = run(str(tmp_path / "lr0"), **{"optimizer.lr": 1e-12,
                                             "training.compute_dtype": "float32"})
    for part in ("unet", "text_encoder"):
        a, b = _flat(jax.device_get(same[part])), _flat(jax.device_get(start[part]))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-9, err_msg=str(k))
    trained, history = run(str(tmp_path / "bf16"), **{"optimizer.lr": 1e-3})
    losses = [h["loss"] for h in history]
    assert len(losses) == 2 and np.all(np.isfinite(losses)), history
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
        jax.tree_util.tree_leaves(trained["unet"]), jax.tree_util.tree_leaves(start["unet"]))]
    assert max(moved) > 0
