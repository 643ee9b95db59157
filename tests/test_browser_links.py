"""Links restore views, in real headless Chromium (Debian's /usr/bin/chromium; never `playwright install`).

One browser context walks the app on the zoo's tiny demo: on every page it
changes at least one choice, waits until the page has redrawn, and copies the
address. Each address is then opened in a NEW browser context (a new
Streamlit session: no workspace, no history), which must rebuild the
workspace from the cache and show the same view: the same widget values, the
same headings and the same figure titles. The Loss Landscape link names a
merge the first session tried (by its recipe), and the Report link the rows
it compared, which the new session scores again.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

import test_browser
from test_browser import CHROMIUM, CHROMIUM_ARGS, check_no_exception, free_port, start_app, stop_server, wait_idle

BUSY_CPU_MS = 300_000   # playwright's waits: this machine's CPU is shared, and a busy one answers in minutes

# every widget's value, the headings and the figure titles: what "the same view" means here
SNAPSHOT_JS = """() => {
  const widgets = [];
  const kinds = ['stSlider', 'stSelectbox', 'stRadio', 'stCheckbox', 'stMultiSelect', 'stNumberInput',
                 'stSelectSlider', 'stToggle'];
  for (const el of document.querySelectorAll(kinds.map(k => `[data-testid="${k}"]`).join(','))) {
    if (el.closest('[data-testid="stExpander"] details:not([open])')) continue;
    const label = (el.querySelector('[data-testid="stWidgetLabel"]') || {}).innerText || '';
    const inputs = [...el.querySelectorAll('input')].map(i =>
        (i.type === 'checkbox' || i.type === 'radio') ? String(i.checked) : i.value);
    const thumbs = [...el.querySelectorAll('[role="slider"]')].map(s => s.getAttribute('aria-valuenow'));
    const shown = [...el.querySelectorAll('[data-baseweb="select"] [value], [data-baseweb="tag"]')]
        .map(s => s.innerText || s.getAttribute('value'));
    const select = (el.querySelector('[role="combobox"], [data-baseweb="select"]') || {}).value
        || (el.querySelector('[data-baseweb="select"]') || {}).innerText || '';
    widgets.push([el.getAttribute('data-testid'), label.trim(), inputs, thumbs, shown, select.trim()]);
  }
  const heads = [...document.querySelectorAll('[data-testid="stMain"] h1, [data-testid="stMain"] h2, '
                                              + '[data-testid="stMain"] h3')].map(h => h.innerText.trim());
  const titles = [...document.querySelectorAll('.js-plotly-plot')].map(p =>
      [...p.querySelectorAll('.gtitle')].map(t => t.textContent).join(' | '));
  return {widgets, heads, titles};
}"""


def widget(page, kind: str, label: str):
    return page.locator(f'[data-testid="{kind}"]', has_text=label).first


def press_slider(page, label: str, key: str = "ArrowRight", times: int = 1) -> None:
    """Move a slider or a select slider (Streamlit renders both as stSlider) by arrow keys."""
    thumb = widget(page, "stSlider", label).get_by_role("slider").first
    for _ in range(times):
        thumb.focus()
        thumb.press(key)
        wait_idle(page)


def choose(page, label: str, option: str | re.Pattern) -> None:
    """Pick an option of a select box: Streamlit >= 1.5x draws it as a react-aria combobox whose
    'Open' button shows the list box (older ones: a baseweb select)."""
    box = widget(page, "stSelectbox", label)
    opener = box.locator('button[aria-haspopup="listbox"], [data-baseweb="select"]').first
    opener.click()
    page.get_by_role("option", name=option).first.click()
    wait_idle(page)


def click_radio(page, label: str, option: str) -> None:
    widget(page, "stRadio", label).get_by_text(option, exact=True).click()
    wait_idle(page)


def settle(page, params: tuple[str, ...] = ()) -> dict:
    """Until the URL holds `params` and the page is idle; then its snapshot."""
    deadline = time.time() + BUSY_CPU_MS / 1000
    while params and time.time() < deadline and not set(params) <= set(parse_qs(urlparse(page.url).query)):
        time.sleep(0.2)
    wait_idle(page)
    time.sleep(0.5)
    wait_idle(page)
    return page.evaluate(SNAPSHOT_JS)


# page -> (what to change in the first session, query parameters the link must then hold)
def change_spectra(page):
    press_slider(page, "Rank fraction kept per task", times=2)
    click_radio(page, "Energy curve of", "mean over layers")
    return ("ws", "sp_f", "sp_scope", "sp_layer")


def change_interference(page):
    click_radio(page, "By block", "sign-conflict rate")
    press_slider(page, "Energy held by the summed matrix", "ArrowLeft")   # a select slider is an stSlider too
    return ("ws", "if_by_layer", "if_f", "if_energy")


def change_merge(page):
    choose(page, "Method", re.compile(r"^ties"))
    press_slider(page, "density", times=2)
    time.sleep(2.5)   # kept on screen: the history keeps it (ui/history.DWELL_S), for Landscape and Report
    return ("ws", "method", "density", "alpha", "split", "subsample")


def change_landscape(page):
    choose(page, "End (λ = 1)", re.compile(r"^merge: ties \("))
    press_slider(page, "λ points", times=2)
    return ("ws", "ll_end", "ll_points", "ll_start")


def change_report(page):
    click_radio(page, "View", "radar")
    return ("ws", "rp_chart", "rp_rows")


def change_alignment(page):
    page.locator('[data-testid="stSidebar"] [data-testid="stRadio"]', has_text="Method") \
        .get_by_text("none (naive)", exact=True).click()
    wait_idle(page)
    press_slider(page, "Points on the path", "ArrowLeft")
    return ("ws", "al_method", "al_lam")


def change_curvature(page):
    press_slider(page, "Subspace rank")
    return ("ws", "cv_rank", "cv_metric", "cv_n")


def change_iterative(page):
    click_radio(page, "Procedure", "ColD Fusion (collaborative descent)")
    return ("ws", "it_procedure", "it_preset", "it_heldout", "it_rounds", "it_steps", "it_method", "it_hsteps")


CHANGES = {"Spectra": change_spectra, "Interference": change_interference, "Merge": change_merge,
           "Loss_Landscape": change_landscape, "Report": change_report, "Alignment": change_alignment,
           "Curvature": change_curvature, "Iterative": change_iterative}


def open_in_new_context(browser, link: str) -> tuple[dict, str]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    ctx.set_default_timeout(BUSY_CPU_MS)
    page = ctx.new_page()
    try:
        page.goto(link, wait_until="domcontentloaded")
        snap = settle(page)
        check_no_exception(page, f"{link} in a new context")
        return snap, page.url
    finally:
        ctx.close()


def drive(cache: Path, log: Path) -> dict:
    from playwright.sync_api import sync_playwright
    port = free_port()
    proc = start_app(cache, port, log)
    out = {"links": {}, "first": {}, "restored": {}}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            ctx = browser.new_context(viewport={"width": 1400, "height": 900})
            ctx.set_default_timeout(BUSY_CPU_MS)
            page = ctx.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector("text=Loaded set")
            out["first"]["Home"] = settle(page, ("ws",))
            out["links"]["Home"] = page.url
            for name, change in CHANGES.items():
                page.locator(f'[data-testid="stSidebarNav"] a[href$="/{name}"]').click()
                page.wait_for_url(re.compile(rf"/{name}(\?.*)?$"))
                wait_idle(page)
                check_no_exception(page, name)
                params = change(page)
                out["first"][name] = settle(page, params)
                check_no_exception(page, f"{name} after a change")
                out["links"][name] = page.url
                print(name, page.url, flush=True)
            for name, link in out["links"].items():
                out["restored"][name], _ = open_in_new_context(browser, link)
            browser.close()
    finally:
        stop_server(proc, 10)
    return out


@pytest.mark.browser
@pytest.mark.timeout(1800)   # the tiny demo is built first (seconds on an idle CPU, minutes on a busy one)
def test_every_page_link_restores_its_view_in_a_new_context(tiny_demo_dir, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
    saved = test_browser.PAGE_TIMEOUT, test_browser.START_TIMEOUT
    test_browser.PAGE_TIMEOUT, test_browser.START_TIMEOUT = 600.0, 300.0   # a busy shared CPU
    try:
        res = drive(tiny_demo_dir, tmp_path / "streamlit.log")
    finally:
        test_browser.PAGE_TIMEOUT, test_browser.START_TIMEOUT = saved
    links = res["links"]
    assert set(links) == {"Home", *CHANGES}
    for name, link in links.items():
        query = parse_qs(urlparse(link).query)
        assert query["ws"] == ["demo-tiny"] and query["ws_build"], (name, link)   # the workspace, by name
    # the choices made in the first session are in the links
    assert parse_qs(urlparse(links["Merge"]).query)["method"] == ["ties"]
    assert parse_qs(urlparse(links["Report"]).query)["rp_chart"] == ["radar"]
    assert parse_qs(urlparse(links["Iterative"]).query)["it_procedure"] == ["cold_fusion"]
    end = parse_qs(urlparse(links["Loss_Landscape"]).query)["ll_end"][0]
    assert end.startswith("merge: ties (") and "#" not in end                     # a recipe, not "merge #8"
    for name in links:
        first, again = res["first"][name], res["restored"][name]
        assert again["heads"] == first["heads"], (name, first["heads"], again["heads"])
        assert again["titles"] == first["titles"], (name, first["titles"], again["titles"])
        assert again["widgets"] == first["widgets"], (name, json.dumps(first["widgets"]),
                                                      json.dumps(again["widgets"]))
    assert any("ties" in t for t in res["restored"]["Merge"]["titles"])
    assert any(h.startswith("Loaded set") for h in res["restored"]["Home"]["heads"])
