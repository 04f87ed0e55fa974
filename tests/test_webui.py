"""The web UI in a headless Chromium (Playwright driving the system's Chromium, :mod:`ht_devkit.browser`): the
template browser lists the pack's templates under "HyperTransport", every template loads with no node missing and
nothing overlapping, and each template that needs no download runs from the browser with its images shown inside
the window, framed as the template opens.

Needs Debian's ``chromium`` and Playwright (``requirements-dev.txt``); skipped with the reason otherwise. With
``HT_UPDATE_SCREENSHOT=1`` the runnable templates' screenshots (after they ran) replace ``docs/<slug>.png`` and their
template-browser thumbnails ``workflows/<title>.jpg`` (cropped to the results); ``docs/screenshot.png`` becomes the
phrase-steering SDXL template as it opens.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from ht_devkit import browser
from workflows.build_workflows import BY_SLUG, HERE, TEMPLATES, WORLD_SWEEP, overlaps

pytestmark = [pytest.mark.comfy, pytest.mark.slow]
REPO = HERE.parent
RAN = [t.slug for t in TEMPLATES if t.runs_here]


@pytest.fixture(scope="module")
def page(comfy_server):
    why = browser.missing()
    if why:
        pytest.skip(why)
    with browser.comfy_page(comfy_server.url) as p:
        yield p


def _workflow(slug: str) -> dict:
    return json.loads((HERE / f"{BY_SLUG[slug].title}.json").read_text())


def test_template_browser_lists_the_templates_under_hypertransport(page, comfy_server):
    """As a user finds them: Templates → HyperTransport (not the folder name), every template with its thumbnail."""
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text("HyperTransport", exact=True).first.click()
    page.wait_for_timeout(1500)
    titles = [t.title for t in TEMPLATES]
    find = """t => Array.from(document.querySelectorAll('[role="dialog"] *')).find(e => e.children.length === 0
                                                                                 && e.textContent.trim() === t)"""
    shown = []
    for t in titles:  # the dialog loads a card's image when the card scrolls into view
        if not page.evaluate(f"t => {{ const el = ({find})(t); if (el) el.scrollIntoView(); return !!el; }}", t):
            shown.append(None)
            continue
        ours = f"""t => {{
            let card = ({find})(t);
            for (let i = 0; i < 6 && card && !card.querySelector('img'); i++) card = card.parentElement;
            const img = card && card.querySelector('img');
            // ours: 512x512 (ht_devkit.browser.write_thumbnail), not the dialog's placeholder (512 wide too)
            return !!(img && img.complete && img.naturalWidth === 512 && img.naturalHeight === 512);
        }}"""
        try:
            page.wait_for_function(ours, arg=t, timeout=10_000)
            shown.append({"thumbnail": True})
        except Exception:
            shown.append({"thumbnail": False})
    missing = [t for t, s in zip(titles, shown) if s is None]
    assert not missing, f"not listed under HyperTransport: {missing}"
    no_thumb = [t for t, s in zip(titles, shown) if not s["thumbnail"]]
    assert not no_thumb, f"no thumbnail shown: {no_thumb}"
    assert "comfyui-hypertransport" not in page.evaluate("() => document.querySelector('[role=\"dialog\"]').innerText")
    page.reload()  # a fresh page, the dialog gone, for the tests that look at the canvas
    page.wait_for_function(browser.READY)


@pytest.mark.parametrize("slug", [t.slug for t in TEMPLATES])
def test_every_template_loads_with_nothing_missing_or_overlapping(page, tmp_path, slug):
    wf = _workflow(slug)
    assert not overlaps(wf), overlaps(wf)
    browser.load_workflow(page, wf, BY_SLUG[slug].title)
    nodes = browser.graph_nodes(page)
    assert len(nodes) == len(wf["nodes"]), (len(nodes), len(wf["nodes"]))
    assert not [n["type"] for n in nodes if n["missing"]]
    assert not page.evaluate("() => document.body.innerText.includes('Invalid workflow')")  # the frontend's own schema
    page.screenshot(path=str(tmp_path / f"{slug}.png"))
    if slug == "text_steering_sdxl_dmd2" and os.environ.get("HT_UPDATE_SCREENSHOT") == "1":
        shutil.copy(tmp_path / f"{slug}.png", REPO / "docs" / "screenshot.png")


def _visible(page, box: dict) -> bool:
    """Inside the window, and the canvas (not a dialog, menu or toolbar) is what shows at its centre and corners."""
    w, h = browser.VIEWPORT["width"], browser.VIEWPORT["height"]
    if not (box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= w and box["y"] + box["height"] <= h):
        return False
    pts = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in ((0.5, 0.5), (0.1, 0.2), (0.9, 0.9))]
    return page.evaluate("pts => pts.every(([x, y]) => document.elementFromPoint(x, y) === app.canvas.canvas)", pts)


@pytest.mark.parametrize("slug", RAN)
def test_template_runs_from_the_browser_and_shows_its_images_framed(page, comfy_server, tmp_path, slug):
    """Queued as a user would (the UI's own queue call) with the view the template opens with: every result preview
    shows its images, each preview lies inside the window."""
    wf = _workflow(slug)
    results = [n["id"] for n in wf["nodes"] if n["type"] == "PreviewImage"]
    browser.load_workflow(page, wf, BY_SLUG[slug].title)
    t0 = time.time()
    page.evaluate("() => app.queuePrompt(0, 1).then(() => true)")
    shown = ("ids => ids.every(id => { const n = app.graph.getNodeById(id);"
             " return n && n.imgs && n.imgs.length > 0 && n.imgs.every(i => i.complete && i.naturalWidth > 0); })")
    try:
        page.wait_for_function(shown, arg=results, timeout=240_000)
    except Exception:  # say what the graph shows and what the server ran, not only "timed out"
        raise AssertionError(f"previews not shown after 240 s: {browser.graph_nodes(page)}\n"
                             f"server log: {comfy_server.log()[-3000:]}") from None
    seconds = time.time() - t0
    page.wait_for_timeout(1000)
    nodes = {n["id"]: n for n in browser.graph_nodes(page)}
    counts = [nodes[i]["images"] for i in results]
    main = [n.id for n in BY_SLUG[slug].build() if n.type == "PreviewImage" and not n.aside]  # not the reference image
    want = [len(WORLD_SWEEP)] if slug == "world_strength_sweep" else [4] * len(main)
    assert [nodes[i]["images"] for i in main] == want, counts
    framed = [i for i in main if _visible(page, browser.screen_box(page, [nodes[i]]))]
    assert framed == main, f"result previews outside the window as the template opens: {set(main) - set(framed)}"
    out = tmp_path / f"{slug}.png"
    page.screenshot(path=str(out))
    assert out.stat().st_size > 50_000
    print(f"{slug} from the browser: {seconds:.1f} s until every image was shown")
    if os.environ.get("HT_UPDATE_SCREENSHOT") == "1":
        shutil.copy(out, REPO / "docs" / f"{slug}.png")
        crop = tmp_path / "crop.png"
        page.screenshot(path=str(crop), clip=browser.clamped(browser.screen_box(page, [nodes[i] for i in main])))
        browser.write_thumbnail(crop, HERE / f"{BY_SLUG[slug].title}.jpg")
