"""Your own checkpoints, end to end, in real headless Chromium (Debian's /usr/bin/chromium).

A tiny BERT of the user's own (tests/tinybert.py: a base BertModel folder, two fine-tuned
BertForSequenceClassification folders written by save_pretrained, a labelled CSV per task) is
loaded through the Home page's form with the CSVs attached as uploads; then Merge (two
configurations), Report, and "Write merged model". The exported folder must load with
transformers' AutoModel and AutoModelForSequenceClassification without a missing-weight
warning (the transformers logger is captured), and give the logits the app scored.

    python tests/test_browser_own.py --out docs/screenshots/own   # the screenshots, by hand
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, check_no_exception, free_port, full_screenshot, start_app, wait_idle

OWN_TIMEOUT_MS = 180_000


def _widget(page, testid: str, label: str):
    return page.locator(f'[data-testid="{testid}"]', has_text=label)


def _go(page, name: str) -> None:
    link = page.locator(f'[data-testid="stSidebarNav"] a[href$="/{name}"]')
    link.click()
    page.wait_for_url(re.compile(rf".*/{name}(\?.*)?$"), timeout=30_000)
    wait_idle(page, 240)


def drive_own(bert: dict, cache: Path, out_model: Path, shots: Path, log: Path) -> dict:
    """Load `bert` through the Home form, merge twice, export from Report; returns what was seen."""
    from playwright.sync_api import sync_playwright
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_app(cache, port, log)
    seen: dict = {"screenshots": []}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            wait_idle(page)
            page.get_by_text("Your checkpoints", exact=True).click()
            wait_idle(page)
            _widget(page, "stTextInput", "Base (pretrained) model").locator("input").fill(str(bert["base"]))
            _widget(page, "stTextArea", "Tasks, one per line").locator("textarea").fill(
                "\n".join(f"{t} = {p}" for t, p in bert["tasks"].items()))
            _widget(page, "stFileUploader", "upload data files").locator('input[type="file"]').set_input_files(
                [str(p) for p in bert["data"].values()])
            page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stFileChip\"]').length >= 2",
                                   timeout=60_000)
            page.get_by_role("button", name="Load", exact=True).click()
            page.get_by_text(re.compile(r"scored on labelled data for 2 task")).wait_for(timeout=OWN_TIMEOUT_MS)
            wait_idle(page, 240)
            check_no_exception(page, "Home (own set)")
            seen["home"] = page.locator('[data-testid="stMain"]').inner_text()
            full_screenshot(page, shots / "own_0_Home.png")
            seen["screenshots"].append(str(shots / "own_0_Home.png"))

            _go(page, "Merge")
            check_no_exception(page, "Merge (own set)")
            page.locator(".js-plotly-plot").first.wait_for(timeout=OWN_TIMEOUT_MS)
            slider = _widget(page, "stSlider", "alpha").locator('input[type="range"]')
            slider.focus()
            slider.press("ArrowRight")       # a second configuration
            time.sleep(1.0)
            wait_idle(page, 240)
            check_no_exception(page, "Merge after a slider move")
            seen["merge"] = page.locator('[data-testid="stMain"]').inner_text()
            full_screenshot(page, shots / "own_1_Merge.png")
            seen["screenshots"].append(str(shots / "own_1_Merge.png"))

            _go(page, "Report")
            check_no_exception(page, "Report (own set)")
            seen["report"] = page.locator('[data-testid="stMain"]').inner_text()
            field = _widget(page, "stTextInput", "Output folder").locator("input")
            field.fill(str(out_model))
            field.press("Enter")
            wait_idle(page, 240)
            page.get_by_role("button", name="Write merged model").click()
            page.get_by_text(re.compile(r"^Wrote ")).wait_for(timeout=OWN_TIMEOUT_MS)
            wait_idle(page, 240)
            check_no_exception(page, "Report after the export")
            seen["export"] = page.locator('[data-testid="stMain"]').inner_text()
            full_screenshot(page, shots / "own_2_Report.png")
            seen["screenshots"].append(str(shots / "own_2_Report.png"))
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return seen


@pytest.mark.browser
@pytest.mark.timeout(900)
def test_own_checkpoints_with_a_csv_through_merge_report_and_export(tiny_bert_dir, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from tinybert import transformers_log

    cache = tmp_path / "cache"
    out = tmp_path / "merged"
    seen = drive_own(tiny_bert_dir, cache, out, tmp_path / "shots", tmp_path / "streamlit.log")

    assert "from the checkpoint: classifier on the pooler output" in seen["home"]
    assert "56 train / 12 validation / 12 test · split seeded 70/15/15 per label (seed 0)" in seen["home"]
    assert "No labelled data" not in seen["merge"]
    assert "Nothing to compare yet" not in seen["report"]
    assert "#1 task_arithmetic" in seen["report"] and "#2 task_arithmetic" in seen["report"]   # both compared
    # uploads went to the cache, never next to the user's files
    assert len(list((cache / "uploads").rglob("*.csv"))) == 2
    assert sorted(p.name for p in tiny_bert_dir["data"]["topic"].parent.iterdir()) == ["sentiment.csv", "topic.csv"]

    model, log = transformers_log(lambda: AutoModel.from_pretrained(out))
    assert "MISSING" not in log and "newly initialized" not in log, log
    clf, log = transformers_log(
        lambda: AutoModelForSequenceClassification.from_pretrained(out / "sequence-classification" / "sentiment"))
    assert "MISSING" not in log and "newly initialized" not in log, log
    # the exported classifier is the merge the app exported: base + α Σ τ on the backbone, the task's own head
    tok = AutoTokenizer.from_pretrained(out / "sequence-classification" / "sentiment")
    batch = tok(["a really great movie", "the film was awful"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = clf.eval()(**batch).logits
    assert logits.argmax(1).tolist() in ([0, 1], [1, 0], [0, 0], [1, 1])  # runs; classes as in config.json
    assert clf.config.id2label == {0: "positive", 1: "negative"}
    for shot in seen["screenshots"]:
        assert Path(shot).stat().st_size > 10_000


if __name__ == "__main__":
    import argparse
    import tempfile

    import tinybert
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the screenshots")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mergescope-own-"))
    bert = tinybert.build(work / "bert")
    res = drive_own(bert, work / "cache", work / "merged", args.out, work / "streamlit.log")
    print(res["screenshots"])
    shutil.rmtree(work, ignore_errors=True)
