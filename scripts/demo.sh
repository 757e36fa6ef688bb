#!/usr/bin/env bash
# Install the package into .venv (created if missing), then the embedded text-to-image job:
# train the KL-f8 first stage on the 64x64 shapes dataset, train the latent text-to-image
# model on its latents, write a grid of test-split captions (held-out colour-shape pairs
# included) beside their samples, and print what both models learned: the shapes checker on
# the first stage's reconstructions of held-out images, then on 400 samples of the latent model
# (200 train-split captions, 200 test-split ones). Extra arguments go to the latent model's
# train.py (e.g. --config.training.num_steps=300); AE_ARGS to the first stage's.
set -euo pipefail
cd "$(dirname "$0")/.."
AE_WORKDIR=${AE_WORKDIR:-workdirs/autoencoder_kl_f8_shapes}
WORKDIR=${WORKDIR:-workdirs/ldm_kl8}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
# shellcheck disable=SC2086
.venv/bin/python train.py --config=configs/autoencoder_kl_f8_shapes.py --workdir="$AE_WORKDIR" ${AE_ARGS:-}
.venv/bin/python train.py --config=configs/ldm_kl8.py --workdir="$WORKDIR" \
  --config.first_stage.workdir="$AE_WORKDIR" "$@"
.venv/bin/python sample.py --workdir="$WORKDIR" --num=16 --split=test --seed=0 \
  --out="$WORKDIR/samples/final_grid.png"
echo "== first stage: reconstructions of held-out images, read by the shapes checker"
.venv/bin/python -m ldm_jax.evaluate --workdir="$AE_WORKDIR" --metrics=adherence,psnr --num=200
echo "== latent model: samples for 200 seen-pair and 200 held-out-pair captions"
.venv/bin/python -m ldm_jax.evaluate --workdir="$WORKDIR" --metrics=adherence --num=400
