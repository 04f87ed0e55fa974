"""GPU check of the CLIP reuse (nodes/comfy_clip.py) with ComfyUI's model management on a CUDA device.

Builds the tiny open_clip CLIP of tests/test_nodes_clip_reuse.py, loads it into ComfyUI's own CLIP
(SD1.5 and SDXL layouts) and ClipVisionModel in ComfyUI's default GPU dtype (fp16), and checks that
the ComfyUI-held towers fingerprint like the open_clip ones and encode like open_clip (fp32, CPU),
with the tensors on the device ComfyUI loaded them to. Prints one line per check; exit 1 on a failure.

    python scripts/gpu_check_clip_reuse.py [--cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU (to try the script without a GPU)")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import ht_devkit
    from ht_devkit import clips as T

    ht_devkit.import_comfyui(base_directory=tempfile.mkdtemp(prefix="ht_clip_check_"), cpu=a.cpu)
    import comfy.model_management as mm
    import open_clip
    import torch
    import torch.nn.functional as F

    pack = ht_devkit.load_pack()  # this repository as ComfyUI imports a custom-node package
    CC = pack.nodes.comfy_clip
    HyperNetHandle = pack.nodes.model_files.HyperNetHandle

    from hypertransport_core.encoders import ConceptEncoder

    tmp = Path(tempfile.mkdtemp())
    (tmp / f"{T.ARCH}.json").write_text(__import__("json").dumps(T.CFG))
    open_clip.add_model_config(str(tmp / f"{T.ARCH}.json"))
    model = ht_devkit.init_random_(T._open_clip_model(0), seed=11)
    enc = ConceptEncoder.from_model(model, open_clip.get_tokenizer(T.ARCH), T.ARCH)
    handle = HyperNetHandle(types.SimpleNamespace(encoder=enc.identity, family="sd15", sites=[]), "check")
    dev = mm.get_torch_device()
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    clip = T.comfy_sd15_clip(model)
    sdxl = T.comfy_sdxl_clip(ht_devkit.init_random_(T._open_clip_model(0), seed=12), model)
    cv = T.comfy_clip_vision(model, tmp)
    ok = True

    def check(name, cond, detail=""):
        nonlocal ok
        ok &= bool(cond)
        print(f"{'PASS' if cond else 'FAIL'} {name} {detail}")

    images = torch.rand((3, 200, 150, 4), generator=torch.Generator().manual_seed(0))
    texts = T.TEXTS
    ref_t, ref_i = enc.encode_text(texts), enc.image_concept(images).embedding
    for label, c in (("sd15", clip), ("sdxl", sdxl)):
        e = CC.text_encoder_for(handle, c, "auto", "check")
        check(f"{label}: the ComfyUI CLIP is used", isinstance(e, CC.ComfyTextEncoder), getattr(e, "describe", str)())
        got = e.encode_text(texts)
        w = e.tower.module.transformer.text_projection.weight
        cos = float(F.cosine_similarity(got, ref_t).min())
        check(f"{label}: text like open_clip", cos > 0.9999, f"cos {cos:.7f}, weights {w.dtype} on {w.device}")
        check(f"{label}: weights where ComfyUI put them", w.device.type == dev.type)
    ie = CC.image_encoder_for(handle, cv, "auto", "check")
    check("clip_vision is used", isinstance(ie, CC.ComfyImageEncoder))
    got = ie.image_concept(images).embedding
    w = cv.model.vision_model.encoder.layers[0].mlp.fc1.weight
    cos = float(F.cosine_similarity(got, ref_i, dim=0))
    check("image like open_clip", cos > 0.9999, f"cos {cos:.7f}, weights {w.dtype} on {w.device}")
    check("vision weights where ComfyUI put them", w.device.type == dev.type)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
