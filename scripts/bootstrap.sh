#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent (a second run takes seconds):
#   .venv/ with requirements-dev.txt (torch 2.14.1 + torchvision 0.29.1, open_clip, POT, ComfyUI's deps),
#   and a ComfyUI 0.3.75 for the node tests: $COMFYUI_DIR if set, else the ComfyUI this pack sits in
#   (custom_nodes/<pack>), else one unpacked into .comfyui/ComfyUI by scripts/get_comfyui.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
want="$(sha256sum requirements-dev.txt | cut -d' ' -f1)"
if [ "$(cat .venv/.requirements.sha 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing requirements-dev.txt into .venv (first time: a few minutes)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -c "import torch, torchvision, open_clip, ot, safetensors, einops" \
    || { echo "bootstrap: the install failed (see above)" >&2; exit 1; }
  echo "$want" > .venv/.requirements.sha
fi
# CI (CI=true, as root) also gets Debian's Chromium so the web-UI test runs instead of skipping.
if [ "${CI:-}" = "true" ] && [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "bootstrap: could not install chromium; the web-UI test will skip" >&2
fi
if [ -n "${COMFYUI_DIR:-}" ]; then
  [ -f "$COMFYUI_DIR/main.py" ] || { echo "bootstrap: COMFYUI_DIR=$COMFYUI_DIR has no main.py" >&2; exit 1; }
elif [ -f ../../main.py ] && [ -d ../../comfy ]; then
  :  # installed in a ComfyUI's custom_nodes: the tests use that ComfyUI
elif [ ! -f .comfyui/ComfyUI/main.py ]; then
  PY=.venv/bin/python bash scripts/get_comfyui.sh .comfyui/ComfyUI >&2
fi
