#!/usr/bin/env bash
# The CPU figures of docs/benchmarks.md: kinship bench (pipeline and compute-only) for BYOL and MoCo v2
# with the small CNN and ResNet-18 (CIFAR stem), then kinship vs lightly's BYOL recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
for backbone in convnet resnet18; do
  steps=30; [ "$backbone" = resnet18 ] && steps=4
  for method in byol mocov2; do
    for mode in "" "--compute-only"; do
      kinship bench --method "$method" --backbone "$backbone" --batch 256 --steps "$steps" $mode
    done
  done
done
python benchmarks/lightly_byol.py --backbone convnet --batch 256 --steps 20
python benchmarks/lightly_byol.py --backbone resnet18 --batch 256 --steps 4
