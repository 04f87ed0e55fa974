"""Where HyperTransport files and CLIP weights are found, and the encoder cache (ComfyUI side).

Folders (registered with ``folder_paths``, so ``extra_model_paths.yaml`` can add more):

* ``hypertransport``: hypernet files, ``<ComfyUI>/models/hypertransport``; open_clip model configs
  (``<arch>.json``) for architectures open_clip does not ship may be put there too.
* ``hypertransport_steerings``: saved single-concept steerings, ``models/hypertransport_steerings``
  and ``output/hypertransport_steerings`` (where Save Steering writes).
* CLIP weights for Encode Concept / Encode Reference Image: ``clip`` (= ``text_encoders``),
  ``clip_vision`` and ``hypertransport``, in open_clip's layout.
* The embedded world's folder (``hypertransport_world/weights`` inside this pack) is added to
  ``hypertransport``, so its hypernet and its CLIP are found without copying anything.

File lists leave out temporary files (``.tmp-*`` from an interrupted save) and, for Load HyperNet and
Load Steering, every ``.safetensors`` whose header is not of that kind (the world's UNet and CLIP files
share the folder).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from hypertransport_core.encoders import ConceptEncoder, check_arch, loader_keys, normalization_of
from hypertransport_core.errors import HyperTransportError
from hypertransport_core.hypernet import HyperNet
from hypertransport_core.lru import LRU
from hypertransport_core.tensorfile import is_temporary, loads_bounded, read_layout
from hypertransport_world.model import UNET_FORMAT

HYPERNET_FOLDER = "hypertransport"
STEERING_FOLDER = "hypertransport_steerings"
CLIP_FOLDERS = ("hypertransport", "clip_vision", "text_encoders")
WEIGHT_EXTS = {".safetensors", ".bin", ".pt", ".pth"}
AUTO = "auto (match the hypernet's encoder)"


WORLD_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hypertransport_world", "weights")


def register_folders() -> None:
    """Add our folders to ComfyUI's ``folder_paths`` (idempotent)."""
    import folder_paths

    root = os.path.join(folder_paths.models_dir, HYPERNET_FOLDER)
    folder_paths.add_model_folder_path(HYPERNET_FOLDER, root, is_default=True)
    folder_paths.add_model_folder_path(HYPERNET_FOLDER, WORLD_WEIGHTS)
    folder_paths.folder_names_and_paths[HYPERNET_FOLDER][1].update({".safetensors", ".json"})
    folder_paths.add_model_folder_path(
        STEERING_FOLDER, os.path.join(folder_paths.models_dir, STEERING_FOLDER), is_default=True
    )
    folder_paths.add_model_folder_path(STEERING_FOLDER, steering_output_dir())
    folder_paths.folder_names_and_paths[STEERING_FOLDER][1].update({".safetensors"})


#: shipped with the pack for the reference-image template; copied into ComfyUI's input folder (LoadImage reads only there)
REFERENCE_IMAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "hypertransport_reference.png")


def install_reference_image() -> None:
    """Copy the shipped reference image into ComfyUI's input folder unless a file of that name is there: never
    overwritten, written whole or not at all; a folder that cannot be written is logged, not raised."""
    import shutil
    import tempfile

    import folder_paths

    folder = folder_paths.get_input_directory()
    dst = os.path.join(folder, os.path.basename(REFERENCE_IMAGE))
    if os.path.exists(dst):
        return
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
        os.close(fd)
        try:
            shutil.copyfile(REFERENCE_IMAGE, tmp)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep it from other users of the folder
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as e:
        log.warning("HyperTransport: could not copy the example reference image into %s (%s); the reference-image "
                    "template then needs an image of yours in Load Image.", folder, e)


def steering_output_dir() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), STEERING_FOLDER)


def list_files(folder: str, exts=(".safetensors",), kind: str | None = None) -> list[str]:
    """File names in a model folder with one of ``exts``, temporary files left out; with ``kind``
    (``"hypertransport.hypernet"``/``"hypertransport.steering"``), only files whose header says so."""
    import folder_paths

    try:
        names = folder_paths.get_filename_list(folder)
    except KeyError:
        return []
    out = [n for n in names if os.path.splitext(n)[1].lower() in exts and not is_temporary(n)]
    if kind is not None:
        out = [n for n in out if _kind_of(folder_paths.get_full_path(folder, n)) == kind]
    return out


_FINGERPRINT = re.compile(r"[0-9a-f]{16}")  # what weights_fingerprint gives: a file name may carry its first 8
_KINDS: LRU[tuple] = LRU(4096)  # (path, size, mtime) -> (format,): a bounded cache
log = logging.getLogger(__name__)


def _kind_of(path: str | None) -> str | None:
    """The ``format`` a file's header records (cached per path, size and mtime); ``None`` for an unreadable file."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_size, st.st_mtime_ns)
    hit = _KINDS.get(key)
    if hit is None:
        try:
            hit = (read_layout(path).metadata.get("format"),)
        except Exception as e:  # one unreadable file is left out of the list, never breaks it
            log.warning("HyperTransport: %s is left out of the model list: %s", os.path.basename(path),
                        str(e).split(" Fix:")[0][:200])
            hit = (None,)
        _KINDS.put(key, hit)
    return hit[0]


def full_path(folder: str, name: str, node: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        where = (
            ", ".join(folder_paths.get_folder_paths(folder))
            if folder in folder_paths.folder_names_and_paths
            else folder
        )
        raise HyperTransportError(
            f"{node}: file {name!r} not found in the {folder!r} model folder ({where}). "
            "Fix: put the file there and press 'r' (refresh) in the UI, or pick another file."
        )
    return path


#: formats a file in the CLIP folders may record that say it is not CLIP weights (the pack's own files)
NOT_CLIP_FORMATS = ("hypertransport.hypernet", "hypertransport.steering", UNET_FORMAT)


def clip_weight_choices() -> list[str]:
    """``auto`` and the weight files of the CLIP folders, leaving out the pack's hypernets, steerings and the world's
    UNet (they share the hypertransport folder with CLIP weights)."""
    import folder_paths

    seen: list[str] = []
    for folder in CLIP_FOLDERS:
        for n in list_files(folder, WEIGHT_EXTS):
            if n in seen or (folder == HYPERNET_FOLDER and n.endswith(".safetensors")
                             and _kind_of(folder_paths.get_full_path(folder, n)) in NOT_CLIP_FORMATS):
                continue
            seen.append(n)
    return [AUTO, *seen]


def check_clip_weights(clip_weights: str | None, node: str) -> str | None:
    """The path of a CLIP weights file picked by name (``None`` for ``auto``); an error naming the folders and the fix
    when it is not there."""
    if not clip_weights or clip_weights == AUTO:
        return None
    path = _clip_path(clip_weights)
    if path is None:
        raise HyperTransportError(
            f"{node}: CLIP weights {clip_weights!r} not found in models/clip, models/clip_vision or "
            "models/hypertransport. Fix: put the file there and refresh, or pick 'auto'."
        )
    if path.endswith(".safetensors") and _kind_of(path) in NOT_CLIP_FORMATS:
        raise HyperTransportError(f"{node}: {clip_weights!r} is a {_kind_of(path)} file, not CLIP weights. Fix: pick the "
                                  "open_clip weights the hypernet was trained with, or 'auto'.")
    return path


def _clip_path(name: str) -> str | None:
    import folder_paths

    for folder in CLIP_FOLDERS:
        try:
            p = folder_paths.get_full_path(folder, name)
        except KeyError:
            p = None
        if p:
            return p
    return None


@dataclass(frozen=True)
class HyperNetHandle:
    """What flows on a HYPERNET wire: the module and the file it came from (for messages)."""

    net: HyperNet
    name: str

    def describe(self) -> str:
        enc = self.net.encoder
        n = len(self.net.sites)
        c = sum(s.channels for s in self.net.sites)
        from hypertransport_core.sites import describe_blocks

        return (
            f"{self.name}: model family {self.net.family}, encoder {enc.get('arch', '?')} "
            f"(fingerprint {str(enc.get('fingerprint', '?'))[:12]}, {enc.get('embed_dim', '?')}-d), "
            f"{n} sites / {c:,} channels; {describe_blocks(self.net.sites, self.net.family)}"
            + (f"; a text concept is encoded as the mean over {len(t)} phrases ({', '.join(map(repr, t[:4]))}"
               f"{', ...' if len(t) > 4 else ''})" if (t := self.net.config.text_templates) else "")
        )


# ---------------------------------------------------------------------------------- encoders ---
_ENCODERS: LRU[ConceptEncoder] = LRU(2)


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def ensure_arch(arch: str) -> None:
    """Register ``<hypertransport folder>/<arch>.json`` with open_clip when it does not know ``arch``: a plain CLIP
    config only (read bounded; no key that loads a Hugging Face or timm model or tokenizer, see
    :func:`~hypertransport_core.encoders.check_arch`). Raises :class:`HyperTransportError` naming the file otherwise."""
    import open_clip

    if not isinstance(arch, str) or arch in open_clip.list_models():
        return
    for name in list_files(HYPERNET_FOLDER, (".json",)):
        if os.path.splitext(os.path.basename(name))[0] == arch:
            path = full_path(HYPERNET_FOLDER, name, "Encode Concept")
            try:
                if os.path.getsize(path) > 1 << 20:
                    raise ValueError("larger than 1 MB")
                with open(path, encoding="utf-8") as f:
                    cfg = loads_bounded(f.read())
            except (OSError, ValueError, RecursionError) as e:
                raise HyperTransportError(f"open_clip config {name}: cannot be read ({str(e)[:80]}). Fix: put a plain "
                                          "open_clip model config (JSON) there, or remove it.") from None
            bad = loader_keys(cfg) if isinstance(cfg, dict) else ["(not a JSON object)"]
            if bad or not isinstance(cfg.get("text_cfg"), dict) or not isinstance(cfg.get("vision_cfg"), dict):
                raise HyperTransportError(
                    f"open_clip config {name}: {'has ' + ', '.join(bad[:4]) if bad else 'lacks text_cfg or vision_cfg'}; "
                    "a config from a model folder may only describe a plain CLIP (no Hugging Face or timm model or "
                    "tokenizer: those fetch files or run code). Fix: remove those keys, or remove the file."
                )
            open_clip.add_model_config(path)
            return


def _load_encoder(arch: str, path: str, mean=None, std=None) -> ConceptEncoder:
    key = (arch, os.path.abspath(path), os.path.getmtime(path), mean, std)
    enc = _ENCODERS.get(key)
    if enc is None:
        ensure_arch(arch)
        enc = _ENCODERS.put(key, ConceptEncoder.from_open_clip(arch, weights=path, mean=mean, std=std))
    return enc


def encoder_for(handle: HyperNetHandle, clip_weights: str, node: str) -> ConceptEncoder:
    """The concept encoder the hypernet was trained with, from ComfyUI's model folders.

    ``clip_weights`` is a file name from :func:`clip_weight_choices` or :data:`AUTO` (files whose
    name contains the architecture, e.g. ``ViT-L-14.safetensors``). The weights' fingerprint must
    match the one the hypernet file records.
    """
    want = handle.net.encoder or {}
    arch, fp = want.get("arch"), want.get("fingerprint")
    if not arch:
        raise HyperTransportError(
            f"{node}: hypernet {handle.name} records no encoder architecture. Fix: re-save it with its encoder identity."
        )
    try:
        ensure_arch(arch)
        check_arch(arch)
        mean, std = normalization_of(want)  # the image normalization the encoder was trained with
    except HyperTransportError as e:
        raise HyperTransportError(f"{node}: hypernet {handle.name}: {e}") from None
    path = check_clip_weights(clip_weights, node)
    if path is not None:
        candidates = [path]
    else:
        candidates = []
        for n in clip_weight_choices()[1:]:
            if _norm(arch) in _norm(os.path.basename(n)) or (isinstance(fp, str) and _FINGERPRINT.fullmatch(fp) and fp[:8] in n):
                p = _clip_path(n)
                if p:
                    candidates.append(p)
        if not candidates:
            raise HyperTransportError(
                f"{node}: no CLIP weights for {arch} found for hypernet {handle.name} (it needs encoder {arch}, "
                f"fingerprint {fp}). Fix: put the open_clip weights as models/clip/{arch}.safetensors "
                "(or in models/clip_vision or models/hypertransport) and refresh, or pick the file in clip_weights."
            )
    found = []
    for path in candidates:  # every candidate is tried: one that fails to load does not hide the others
        try:
            enc = _load_encoder(arch, path, mean, std)
        except Exception as e:  # open_clip/torch raise many types for a file that is not these weights
            found.append(f"{os.path.basename(path)} (does not load as {arch}: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        if not fp or enc.identity.get("fingerprint") == fp:
            return enc
        found.append(f"{os.path.basename(path)} (fingerprint {enc.identity.get('fingerprint')})")
    raise HyperTransportError(
        f"{node}: hypernet {handle.name} was trained with encoder {arch} fingerprint {fp}; "
        f"found {', '.join(found)}. Fix: put the CLIP weights the hypernet was trained with in models/clip "
        "(Load HyperNet shows its encoder) and pick it in clip_weights, or use a hypernet trained for these weights."
    )
