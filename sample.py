"""Sample from the latest checkpoint of a training workdir and write a PNG grid.

python sample.py --workdir=DIR --num=16 --steps=50 --sampler=ddim --seed=0 --out=samples.png
python sample.py --workdir=AUTOENCODER_DIR --reconstruct --num=16 --split=validation
python sample.py --workdir=LDM_DIR --prompt="a large red circle in the center on a gray background"
python sample.py --pretrained=SD_FOLDER --prompt="an astronaut riding a horse" --steps=30 \
    --guidance=7.5 --sampler=dpmpp_2m --height=512 --width=512 --num=4 --out=DIR/

What it does depends on the workdir's stage: diffusion stages draw new images, an autoencoder
reconstructs held-out images (input | reconstruction pairs) and prints PSNR/SSIM.
"""
import sys

from absl import flags

from ldm_jax import cli
from ldm_jax.diffusion.samplers import SAMPLERS

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by train.py.")
_NUM = flags.DEFINE_integer("num", None, "Number of images (default 16; with --prompt or "
                            "--class, one per value given; fewer values are repeated).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's sampling.num_steps).")
_SAMPLER = flags.DEFINE_enum("sampler", None, list(SAMPLERS), "Sampler (default: the config's).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (default: the config's).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_OUT = flags.DEFINE_string("out", None, "Output PNG (default: DIR/samples/sample_seed{seed}.png), "
                           "or a folder (ending in /): each image as its own PNG, the grid beside it as FOLDER_grid.png.")
_RAW = flags.DEFINE_bool("raw_params", False, "Use the raw params even where the config's "
                         "sampling.use_ema asks for the EMA params.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Label-conditioned models: classifier-free "
                               "guidance scale (default: the config's; 1 = none).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "test", "validation"],
                           "Label-conditioned models: sample with the labels of this split's "
                           "first --num records; --reconstruct: the images to reconstruct. "
                           "'validation' is the held-out split ('test' for shapes and CIFAR-10).")
_LATENT_SCALE = flags.DEFINE_bool("latent_scale", False, "Autoencoder workdirs: recompute "
                                  "1/std of the latents (or the config's fixed scale) and store "
                                  "it as WORKDIR/latent_scale.json.")
_RECONSTRUCT = flags.DEFINE_bool("reconstruct", False, "Autoencoder workdirs: reconstruct --num "
                                 "images of --split and report PSNR/SSIM.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Text-conditioned models: a prompt "
                                    "(repeat the flag for several).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Text-conditioned models: a file with "
                                   "one prompt per line.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Text-conditioned models: what the "
                                "guidance steers away from (default: the empty prompt).")
_CLASS = flags.DEFINE_multi_string("class", None, "Label-conditioned models: a class, as a "
                                   "number or name (repeatable); several labels as key=value,...")
_INIT_IMAGE = flags.DEFINE_string("init_image", None, "Latent models: the picture img2img starts "
                                  "from, inpainting repaints, or super-resolution enlarges.")
_STRENGTH = flags.DEFINE_float("strength", None, "img2img: how much of the sampling runs from "
                               "--init_image (0 keeps it, 1 ignores it; default 0.8).")
_MASK = flags.DEFINE_string("mask", None, "Inpainting: a mask picture, white where to repaint.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "Instead of --workdir: a diffusers Stable "
                                  "Diffusion folder, a CompVis .ckpt/.safetensors file or an "
                                  "ldm-jax workdir, converted in memory.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "--pretrained CompVis files: a folder with "
                                 "CLIP's vocab.json and merges.txt.")
_PARAMETERIZATION = flags.DEFINE_enum("parameterization", None, ["eps", "v"], "--pretrained "
                                      "SD 2 CompVis files: the objective (v: 768x768 models).")
_HEIGHT = flags.DEFINE_integer("height", None, "Latent models: image height (default: the "
                               "config's data.image_size).")
_WIDTH = flags.DEFINE_integer("width", None, "Latent models: image width (default: the "
                              "config's data.image_size).")
_CAPTION = flags.DEFINE_string("caption", None, "Label-conditioned shapes models: draw every "
                               "image from this caption, e.g. 'a large red circle in the center "
                               "on a gray background'.")


def _prompts():
    prompts = list(_PROMPT.value or [])
    if _PROMPT_FILE.value:
        try:
            with open(_PROMPT_FILE.value) as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            cli.fail(f"--prompt_file={_PROMPT_FILE.value} cannot be read ({e.strerror})")
        if not prompts:
            cli.fail(f"--prompt_file={_PROMPT_FILE.value} holds no prompt (one per line)")
    return prompts or None


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; options are written --name=value")
    if bool(_WORKDIR.value) == bool(_PRETRAINED.value):
        cli.fail("pass --workdir=DIR (the directory train.py wrote) or --pretrained=PATH (a "
                 "Stable Diffusion folder or file), one of them")
    cli.enable_compilation_cache()
    from ldm_jax import config_utils
    options = {"num": _NUM.value, "steps": _STEPS.value, "sampler": _SAMPLER.value,
               "eta": _ETA.value, "seed": _SEED.value, "out": _OUT.value,
               "raw_params": _RAW.value, "step": _STEP.value, "guidance": _GUIDANCE.value,
               "split": _SPLIT.value, "caption": _CAPTION.value,
               "reconstruct": _RECONSTRUCT.value, "latent_scale": _LATENT_SCALE.value,
               "prompts": _prompts(), "negative_prompt": _NEGATIVE.value,
               "classes": _CLASS.value, "init_image": _INIT_IMAGE.value,
               "strength": _STRENGTH.value, "mask": _MASK.value,
               "height": _HEIGHT.value, "width": _WIDTH.value,
               "tokenizer": _TOKENIZER.value, "parameterization": _PARAMETERIZATION.value}
    with cli.readable_errors():
        if _PRETRAINED.value:
            from ldm_jax.txt2img import sample_pretrained
            print(sample_pretrained(_PRETRAINED.value, options))
            return
        config = config_utils.load_config(_WORKDIR.value)
        line = config_utils.stage_module(config.stage).sample(_WORKDIR.value, config, options)
    print(line)

if __name__ == "__main__":
    sys.exit(cli.run(main))
