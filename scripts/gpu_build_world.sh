#!/usr/bin/env bash
# Rebuild the embedded world's CLIP and UNet on a CUDA machine (same recipe and step counts as a CPU
# rebuild: `python -m hypertransport_world.build`), writing to ${OUT:-runs/world_build}.
# The world is built in ComfyUI's classes: the machine needs the ComfyUI tree (carry .comfyui/ to it, or set COMFYUI_DIR).
# Wheels for packages the machine lacks (open_clip_torch, ftfy, wcwidth) may be put in .whl/.
set -euo pipefail
OUT=${OUT:-runs/world_build}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())"
python3 -m hypertransport_world.build --seed 0 --out "$OUT/w" --device cuda --threads 8 --eval-n 520 2>&1 | grep -v "it/s\]$" | tee "$OUT/build.log"
