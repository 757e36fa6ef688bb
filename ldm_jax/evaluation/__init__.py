"""Evaluation: Inception metrics (FID, KID, IS, precision/recall), autoencoder image quality
(PSNR, SSIM, LPIPS) and the shapes dataset's adherence checker."""
