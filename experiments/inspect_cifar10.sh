#!/usr/bin/env bash
# The pictures of experiments/README.md, "Inspecting a trained ViT".
#
# Run from the repository root:
#   experiments/inspect_cifar10.sh
# The model defaults to the workdir of a configs/pretrain.py:cifar10 run
# (3000 steps), made by
#   python -m vit_jax.main --config=configs/pretrain.py:cifar10 \
#       --workdir=/tmp/vit_cifar10_run --config.data_dir=../shared/data/tensorflow_datasets
# Another model: set MODEL, e.g.
#   MODEL="--model=/tmp/other_run" experiments/inspect_cifar10.sh
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-experiments/inspect}
MODEL=${MODEL:---model=/tmp/vit_cifar10_run}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# 512 CIFAR-10 test images as PNG files (the CLI reads image files).
python - "$DATA/tensorflow_datasets" "$TMP/cifar10_test" <<'PY'
import os, sys
import tensorflow_datasets as tfds
from PIL import Image
data_dir, out = sys.argv[1:]
os.makedirs(out)
names = tfds.builder('cifar10', data_dir=data_dir).info.features['label'].names
for i, ex in enumerate(tfds.as_numpy(tfds.load(
    'cifar10', split='test[:512]', data_dir=data_dir, download=False))):
  Image.fromarray(ex['image']).save(f'{out}/{i:04d}_{names[ex["label"]]}.png')
PY

# In distribution: CIFAR-10 test images (maps, distances over all 512).
python -m vit_jax.inspect $MODEL --per_layer --max_images=512 --num_show=8 \
    --output="$TMP/cifar10" "$TMP/cifar10_test"
# Real photos of all 1000 ImageNet classes, seen at the model's 32x32.
python -m vit_jax.inspect $MODEL --per_layer --max_images=1000 --num_show=8 \
    --output="$TMP/imagenet" "$DATA/imagenet_samples"

mkdir -p "$OUT"
for f in posemb_similarity embedding_filters attention_rollout \
         attention_per_layer attention_distance; do
  cp "$TMP/cifar10/$f.png" "$OUT/cifar10_$f.png"
done
for f in attention_rollout attention_per_layer attention_distance; do
  cp "$TMP/imagenet/$f.png" "$OUT/imagenet_$f.png"
done
du -ch "$OUT"/*.png | tail -1
