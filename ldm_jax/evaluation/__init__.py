"""Evaluation metrics (image quality for autoencoder reconstructions), computed on device in jnp."""
