"""python -m ldm_jax.convert SRC DST: Stable Diffusion weights <-> ldm-jax.

  SRC a diffusers folder or a CompVis .ckpt/.safetensors file -> DST an ldm-jax workdir
      (python sample.py --workdir=DST samples it; fine-tuning configs start from it)
  --to_diffusers: SRC (an ldm-jax workdir, or either of the above) -> DST a diffusers folder
      (StableDiffusionPipeline.from_pretrained(DST) in PyTorch)
CompVis files hold no tokenizer: pass --tokenizer=DIR (vocab.json + merges.txt, e.g. a
diffusers folder's tokenizer/), and for SD 2 --parameterization=v or eps.
"""
from __future__ import annotations

import argparse
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="diffusers folder, CompVis file, or (with --to_diffusers) an "
                               "ldm-jax workdir")
    p.add_argument("dst", help="the folder to write (new or empty)")
    p.add_argument("--to_diffusers", action="store_true", help="write a diffusers folder")
    p.add_argument("--tokenizer", default=None, help="CompVis files: CLIP's vocab.json + "
                                                     "merges.txt folder")
    p.add_argument("--parameterization", choices=("eps", "v"), default=None,
                   help="CompVis SD 2 files: the objective (v for the 768x768 models)")
    p.add_argument("--no_ema", action="store_true", help="CompVis files: the raw U-Net "
                                                         "weights instead of the EMA ones")
    return p


def main(argv=None) -> int:
    from ldm_jax import cli
    args = _parser().parse_args(argv)
    cli.use_fast_cpu_flags()
    with cli.readable_errors():
        start = time.time()
        from ldm_jax.stable_diffusion import load as latent_model
        if args.to_diffusers:
            from ldm_jax.convert.to_diffusers import write_diffusers
            config, loaded = latent_model.load(
                args.src, tokenizer=args.tokenizer, use_ema=False if args.no_ema else None,
                parameterization=args.parameterization)
            path = write_diffusers(config, loaded, args.dst)
        else:
            if latent_model.is_workdir(args.src):
                cli.fail(f"{args.src} is already an ldm-jax workdir; pass --to_diffusers to "
                         "export it as a diffusers folder")
            from ldm_jax.stable_diffusion import read, workdir
            sd = read.read(args.src, tokenizer=args.tokenizer,
                                       use_ema=not args.no_ema,
                                       parameterization=args.parameterization)
            path = workdir.write_workdir(sd, args.dst)
        print(f"wrote {path} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
