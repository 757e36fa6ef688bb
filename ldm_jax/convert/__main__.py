"""python -m ldm_jax.convert SRC DST: see ldm_jax/stable_diffusion/convert_cli.py."""
from ldm_jax.stable_diffusion.convert_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
