"""ComfyUI's own web UI in a headless Chromium, driven by Playwright, for the web-UI tests and for building the
workflow files (the frontend itself serializes the graphs).

Playwright drives the system's Chromium (Debian's ``chromium``; ``apt-get install -y chromium``), so no browser
is downloaded. Everything stays on loopback.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import urllib.request
from collections.abc import Iterator

#: the window the tests and the thumbnails see
VIEWPORT = {"width": 1920, "height": 1080}
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-dev-shm-usage"]
#: the frontend is ready: its graph exists and the node definitions (ComfyUI's and the pack's) are registered
READY = ("!!(window.app && window.app.graph && window.LiteGraph && window.LiteGraph.registered_node_types"
         " && Object.keys(window.LiteGraph.registered_node_types).some(k => k.startsWith('HyperTransport')))")


def find_chromium() -> str | None:
    """The system's Chromium (or Chrome), or ``None``."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def missing() -> str | None:
    """Why the browser cannot run here (``None`` when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed: `pip install -r requirements-dev.txt` (playwright, for the system Chromium)"
    if find_chromium() is None:
        return "no Chromium found; install it with `apt-get update && apt-get install -y chromium`"
    return None


def _no_first_run_dialog(url: str) -> None:
    """Mark the tutorial done, so the first-run template dialog does not cover the canvas."""
    req = urllib.request.Request(url + "/settings/Comfy.TutorialCompleted", data=b"true",
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).read()


@contextlib.contextmanager
def comfy_page(url: str, *, timeout_s: float = 120) -> Iterator:
    """A Playwright ``Page`` on the ComfyUI server at ``url``, its frontend loaded with the pack's nodes."""
    why = missing()
    if why:
        raise RuntimeError(why)
    from playwright.sync_api import sync_playwright

    _no_first_run_dialog(url)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), args=FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(timeout_s * 1000)
            page.goto(url + "/")
            page.wait_for_function(READY)
            yield page
        finally:
            browser.close()


def load_workflow(page, workflow: dict, name: str) -> None:
    """Open a workflow as dragging its file in does (``app.loadGraphData``)."""
    page.evaluate("([wf, name]) => app.loadGraphData(wf, true, true, name).then(() => true)", [workflow, name])
    page.wait_for_timeout(500)


def graph_nodes(page) -> list[dict]:
    """The loaded graph's nodes as the frontend holds them: id, type, position, size, whether the type is missing, and
    how many images it shows."""
    return page.evaluate(
        "() => (app.graph._nodes || app.graph.nodes).map(n => ({id: n.id, type: n.type, pos: [...n.pos], size: [...n.size],"
        " missing: !LiteGraph.registered_node_types[n.type],"
        " images: n.imgs ? n.imgs.filter(i => i.complete && i.naturalWidth > 0).length : 0}))")


def screen_box(page, nodes: list[dict]) -> dict:
    """The screen rectangle the given graph nodes cover, title bars included (it may reach outside the window: give
    :func:`clamped` of it to a screenshot's ``clip``)."""
    ds = page.evaluate("() => ({scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset]})")
    s, (ox, oy) = ds["scale"], ds["offset"]
    rect = page.evaluate("() => { const r = app.canvas.canvas.getBoundingClientRect(); return [r.left, r.top]; }")
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes) - 30  # the title bar sits above pos
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    left, top = rect[0] + (x0 + ox) * s, rect[1] + (y0 + oy) * s
    return {"x": left, "y": top, "width": (x1 - x0) * s, "height": (y1 - y0) * s}


def clamped(box: dict) -> dict:
    """``box`` cut to the window."""
    x0, y0 = max(0.0, box["x"]), max(0.0, box["y"])
    x1 = min(float(VIEWPORT["width"]), box["x"] + box["width"])
    y1 = min(float(VIEWPORT["height"]), box["y"] + box["height"])
    return {"x": x0, "y": y0, "width": max(1.0, x1 - x0), "height": max(1.0, y1 - y0)}


def dumps(obj) -> str:
    return json.dumps(obj, indent=1) + "\n"


def write_thumbnail(png, jpg, box=None, side: int = 512) -> None:
    """A square JPEG of a screenshot (or of ``box`` of it), the content fitted inside on the canvas colour: the template
    browser shows square cards."""
    from PIL import Image

    im = Image.open(png).convert("RGB")
    if box:
        im = im.crop(box)
    im.thumbnail((2 * side, 2 * side))
    canvas = Image.new("RGB", (2 * side, 2 * side), (32, 32, 32))
    canvas.paste(im, ((2 * side - im.width) // 2, (2 * side - im.height) // 2))
    canvas.resize((side, side), Image.LANCZOS).save(jpg, quality=85)
