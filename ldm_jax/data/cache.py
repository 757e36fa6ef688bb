"""python -m ldm_jax.data.cache --config=... --out=DIR: see ldm_jax/stages/latent_cache.py."""
if __name__ == "__main__":
    from ldm_jax.stages.latent_cache import main
    main()
