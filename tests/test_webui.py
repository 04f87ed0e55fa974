"""The web UI in a headless Chromium: it lists the nodes, loads every workflow with none missing, and runs the
embedded-world template from the browser with its images shown in the graph.

Needs Debian's ``chromium`` (``apt-get update && apt-get install -y chromium``); skipped with the
reason otherwise. Chromium is driven over the DevTools protocol (aiohttp's websocket client, already a
ComfyUI dependency), on loopback only. A screenshot per workflow is written to the test's temp folder;
with ``HT_UPDATE_SCREENSHOT=1`` the world template's (after it ran) replaces ``docs/world_steering.png``,
the text-steering one ``docs/screenshot.png``, and each workflow's screenshot becomes its template-browser
thumbnail ``workflows/<name>.jpg``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1920,1080",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


class CDP:
    """A minimal DevTools-protocol client for one page."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params):
        self.n += 1
        my = self.n
        await self.ws.send_json({"id": my, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=120)
            if msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expr: str):
        r = await self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {expr[:80]!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_for(self, expr: str, timeout: float = 90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if await self.js(expr):
                    return
            except RuntimeError:
                pass
            await asyncio.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {expr}")


@pytest.fixture(scope="module")
def chromium(comfy_server, tmp_path_factory):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium found; install it with `apt-get update && apt-get install -y chromium`")
    import ht_devkit

    port = ht_devkit.free_port()
    profile = tmp_path_factory.mktemp("chromium_profile")
    proc = subprocess.Popen(
        [
            exe,
            *FLAGS,
            f"--remote-debugging-port={port}",
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
            page = next(t for t in targets if t.get("type") == "page")
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("Chromium did not start its DevTools endpoint")
            time.sleep(0.3)
    yield page["webSocketDebuggerUrl"]
    proc.terminate()  # our own browser, by its handle
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def no_first_run_dialog(server) -> None:
    """Mark the tutorial done, so the first-run template dialog does not cover the canvas."""
    req = urllib.request.Request(server.url + "/settings/Comfy.TutorialCompleted", data=b"true",
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).read()


def test_web_ui_lists_nodes_and_loads_workflows(comfy_server, chromium, tmp_path):
    import aiohttp

    no_first_run_dialog(comfy_server)

    async def session():
        async with aiohttp.ClientSession() as s, s.ws_connect(chromium, max_msg_size=0) as ws:
            cdp = CDP(ws)
            await cdp.call("Page.enable")
            await cdp.call("Runtime.enable")
            await cdp.call("Page.navigate", url=comfy_server.url + "/")
            await cdp.wait_for(
                "!!(window.app && window.app.graph && window.LiteGraph "
                "&& Object.keys(window.LiteGraph.registered_node_types).length > 100)"
            )
            registered = await cdp.js(
                "Object.keys(LiteGraph.registered_node_types).filter(k => k.startsWith('HyperTransport'))"
            )
            results = {}
            for wf in WORKFLOWS:
                data = json.loads(wf.read_text())
                await cdp.js(
                    f"app.loadGraphData({json.dumps(data)}, true, true, {json.dumps(wf.stem)}).then(() => true)"
                )
                await asyncio.sleep(1.0)
                results[wf.stem] = await cdp.js(
                    "(() => { const nodes = app.graph._nodes || app.graph.nodes;"
                    " return {count: nodes.length,"
                    " missing: nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),"
                    " errors: nodes.filter(n => n.has_errors).map(n => n.type)}; })()"
                )
                shot = await cdp.call("Page.captureScreenshot", format="png")
                (tmp_path / f"{wf.stem}.png").write_bytes(base64.b64decode(shot["data"]))
            return registered, results

    registered, results = asyncio.run(session())
    assert {
        "HyperTransportLoadHyperNet",
        "HyperTransportEncodeConcept",
        "HyperTransportEncodeReferenceImage",
        "HyperTransportApplySteering",
    } <= set(registered), registered
    for name, r in results.items():
        wf = json.loads((REPO / "workflows" / f"{name}.json").read_text())
        assert r["count"] == len(wf["nodes"]), (name, r)
        assert not r["missing"] and not r["errors"], (name, r)
    shot = tmp_path / "text_steering_sdxl_dmd2.png"
    assert shot.stat().st_size > 10_000
    if os.environ.get("HT_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "screenshot.png")
        for wf in WORKFLOWS:
            if wf.stem not in RAN:  # those that run in the browser get a thumbnail of their results instead
                write_thumbnail(tmp_path / f"{wf.stem}.png", REPO / "workflows" / f"{wf.stem}.jpg")


RAN = ("world_steering", "world_strength_sweep", "fit_steering")


def write_thumbnail(png: Path, jpg: Path, box=None) -> None:
    """A 512x288 JPEG of a screenshot (or of ``box`` of it), as ComfyUI's template browser shows beside a workflow."""
    from PIL import Image

    im = Image.open(png).convert("RGB")
    if box:
        im = im.crop(box)
    im.thumbnail((1024, 576))
    canvas = Image.new("RGB", (1024, 576), (32, 32, 32))
    canvas.paste(im, ((1024 - im.width) // 2, (576 - im.height) // 2))
    canvas.resize((512, 288), Image.LANCZOS).save(jpg, quality=85)


@pytest.mark.parametrize("name", RAN)
def test_template_runs_from_the_browser_and_shows_its_images(comfy_server, chromium, tmp_path, name):
    """Queue the template as a user would (the UI's own queue call), then look at the graph: every preview
    node shows its images, and the screenshot holds them."""
    import aiohttp

    from workflows.build_workflows import WORLD_SWEEP

    wf = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    previews = [n["id"] for n in wf["nodes"] if n["type"] == "PreviewImage"]
    no_first_run_dialog(comfy_server)

    async def session():
        async with aiohttp.ClientSession() as s, s.ws_connect(chromium, max_msg_size=0) as ws:
            cdp = CDP(ws)
            await cdp.call("Page.enable")
            await cdp.call("Runtime.enable")
            await cdp.call("Page.navigate", url=comfy_server.url + "/")
            await cdp.wait_for("!!(window.app && window.app.graph && window.LiteGraph)")
            await cdp.js(f"app.loadGraphData({json.dumps(wf)}, true, true, {json.dumps(name)}).then(() => true)")
            await asyncio.sleep(1.0)
            # frame the preview nodes (the right part of the graph) first: the frontend loads a node's images
            # when it draws the node, so one off-screen never shows them
            pv = [n for n in wf["nodes"] if n["type"] == "PreviewImage"]
            x0, y0 = min(n["pos"][0] for n in pv), min(n["pos"][1] for n in pv)
            x1 = max(n["pos"][0] + n.get("size", [400, 300])[0] for n in pv)
            y1 = max(n["pos"][1] + n.get("size", [400, 300])[1] for n in pv)
            scale = min(1.0, 680 / (y1 - y0), 860 / (x1 - x0))  # below the top bar, in the right half
            await cdp.js(f"(() => {{ app.canvas.ds.scale = {scale}; app.canvas.ds.offset = [{1000 / scale - x0}, {150 / scale - y0}];"
                         " app.canvas.setDirty(true, true); return true; })()")
            await asyncio.sleep(1.0)
            t0 = time.time()
            await cdp.js("app.queuePrompt(0, 1).then(() => true)")
            shown = (
                "(() => { const ids = " + json.dumps(previews) + ";"
                " return ids.every(id => { const n = app.graph.getNodeById(id);"
                " return n && n.imgs && n.imgs.length > 0 && n.imgs.every(i => i.complete && i.naturalWidth > 0); }); })()"
            )
            try:
                await cdp.wait_for(shown, timeout=240)
            except TimeoutError:  # say what the graph shows and what the server ran, not only "timed out"
                state = await cdp.js("JSON.stringify(" + json.dumps(previews) + ".map(id => { const n = app.graph.getNodeById(id);"
                                     " return [id, n ? n.type : null, n && n.imgs ? n.imgs.length : null]; }))")
                async with s.get(comfy_server.url + "/history") as r:
                    hist = await r.text()
                raise AssertionError(f"previews not shown after 240 s: {state}\nhistory: {hist[-3000:]}\n"
                                     f"server log: {comfy_server.log()[-3000:]}") from None
            seconds = time.time() - t0
            await asyncio.sleep(1.0)
            counts = await cdp.js("(() => " + json.dumps(previews) + ".map(id => app.graph.getNodeById(id).imgs.length))()")
            shot = await cdp.call("Page.captureScreenshot", format="png")
            return counts, seconds, base64.b64decode(shot["data"])

    counts, seconds, png = asyncio.run(session())
    want = [len(WORLD_SWEEP)] if name == "world_strength_sweep" else [4] * len(previews)
    assert counts == want, counts  # every row shown: four seeds per row, or one image per strength
    out = tmp_path / f"{name}.png"
    out.write_bytes(png)
    assert out.stat().st_size > 50_000
    print(f"{name} from the browser: {seconds:.1f} s until every image was shown")
    if os.environ.get("HT_UPDATE_SCREENSHOT") == "1":
        shutil.copy(out, REPO / "docs" / f"{name}.png")
        write_thumbnail(out, REPO / "workflows" / f"{name}.jpg", box=(960, 110, 1920, 880))
