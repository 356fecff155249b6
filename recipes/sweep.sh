#!/usr/bin/env bash
# Every divergence x estimator of a recipe, one run each: the comparison the paper makes.
# Usage: bash recipes/sweep.sh recipes/qwen3-math.yaml [runs/sweep]    (not yet run on a GPU)
set -euo pipefail
config="$1"; out="${2:-runs/sweep-$(basename "$config" .yaml)}"
for divergence in rkl fkl jsd; do
  for estimator in opd opd+; do
    opdplus train --config "$config" --divergence "$divergence" --estimator "$estimator" \
      --out "$out/$divergence-${estimator/+/plus}" --resume
  done
done
