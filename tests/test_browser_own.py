"""Your own checkpoints, end to end, in real headless Chromium (Debian's /usr/bin/chromium).

A tiny BERT of the user's own (tests/tinybert.py: a base BertModel folder, two fine-tuned
BertForSequenceClassification folders written by save_pretrained, a labelled CSV per task) is
uploaded from the browser (each folder zipped, "Put the uploads into the form") and loaded
through the Home page's form with the CSVs attached as uploads; then Merge (two
configurations), Report, and "Write merged model". The exported folder must load with
transformers' AutoModel and AutoModelForSequenceClassification without a missing-weight
warning (the transformers logger is captured), hold base + α·Σ τ for the configuration exported, and
give each task's classifier the logits of that backbone with the task's own head.

    python tests/test_browser_own.py --out docs/screenshots/own   # the screenshots, by hand
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from test_browser import (CHROMIUM, CHROMIUM_ARGS, check_no_exception, free_port, full_screenshot, start_app,
                          stop_server, wait_idle)

OWN_TIMEOUT_MS = 180_000


def _widget(page, testid: str, label: str):
    return page.locator(f'[data-testid="{testid}"]', has_text=label)


def _go(page, name: str) -> None:
    link = page.locator(f'[data-testid="stSidebarNav"] a[href$="/{name}"]')
    link.click()
    page.wait_for_url(re.compile(rf".*/{name}(\?.*)?$"), timeout=30_000)
    wait_idle(page, 240)


def zip_folder(folder: Path, out: Path) -> Path:
    """A Hugging Face folder as the user would zip it: one top-level folder named like the zip."""
    import zipfile
    with zipfile.ZipFile(out, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"{out.stem}/{f.relative_to(folder)}")
    return out


def drive_own(bert: dict, cache: Path, out_model: Path, shots: Path, log: Path,
              uploads: list[Path] | None = None) -> dict:
    """Load `bert` through the Home form (its checkpoints by path, or `uploads`: zipped checkpoint folders
    uploaded from the browser), merge twice, export from Report; returns what was seen."""
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
            if uploads:   # small checkpoints from the browser: zipped folders, then "Put the uploads into the form"
                page.get_by_text(re.compile(r"^Upload checkpoints from this browser")).click()
                _widget(page, "stFileUploader", "Checkpoints").locator('input[type="file"]').set_input_files(
                    [str(p) for p in uploads])
                page.get_by_role("button", name="Put the uploads into the form").click(timeout=OWN_TIMEOUT_MS)
                wait_idle(page, 240)
                seen["form_base"] = _widget(page, "stTextInput", "Base (pretrained) model").locator("input") \
                    .input_value()
                seen["form_tasks"] = _widget(page, "stTextArea", "Tasks, one per line").locator("textarea") \
                    .input_value()
            else:
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
            time.sleep(2.5)   # kept on screen long enough to be a history row (ui/history.DWELL_S)
            slider = _widget(page, "stSlider", "alpha").locator('input[type="range"]')
            slider.focus()
            slider.press("ArrowRight")       # a second configuration
            time.sleep(1.0)
            wait_idle(page, 240)
            time.sleep(2.5)
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
        stop_server(proc, 10)
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
    zips = [zip_folder(tiny_bert_dir["base"], tmp_path / "base.zip")]
    zips += [zip_folder(folder, tmp_path / f"{task}.zip") for task, folder in tiny_bert_dir["tasks"].items()]
    seen = drive_own(tiny_bert_dir, cache, out, tmp_path / "shots", tmp_path / "streamlit.log", uploads=zips)
    # the uploaded checkpoints were kept in the cache and put into the form
    assert Path(seen["form_base"]).is_relative_to(cache / "uploads"), seen["form_base"]
    lines = dict(line.split(" = ") for line in seen["form_tasks"].splitlines())
    assert set(lines) == {"sentiment", "topic"} and all(Path(p).is_relative_to(cache) for p in lines.values())

    assert "from the checkpoint: classifier on the pooler output" in seen["home"]
    assert "56 train / 12 validation / 12 test · split seeded 70/15/15 per label (seed 0)" in seen["home"]
    assert "No labelled data" not in seen["merge"]
    assert "Nothing to compare yet" not in seen["report"]
    assert "#1 task_arithmetic" in seen["report"] and "#2 task_arithmetic" in seen["report"]   # both compared
    # uploads went to the cache, never next to the user's files
    assert len(list((cache / "uploads").rglob("*.csv"))) == 2
    assert len(list((cache / "uploads").rglob("config.json"))) == 3
    assert sorted(p.name for p in tiny_bert_dir["data"]["topic"].parent.iterdir()) == ["sentiment.csv", "topic.csv"]

    model, log = transformers_log(lambda: AutoModel.from_pretrained(out))
    assert "MISSING" not in log and "newly initialized" not in log, log
    # the exported configuration is the last row, #2: task arithmetic at the α the slider moved to
    alpha = float(re.search(r"#2 task_arithmetic \(alpha=([0-9.]+)\)", seen["report"]).group(1))
    assert alpha != 0.3
    base = AutoModel.from_pretrained(tiny_bert_dir["base"]).state_dict()
    fine = {t: AutoModelForSequenceClassification.from_pretrained(p).eval() for t, p in tiny_bert_dir["tasks"].items()}
    merged = {n: base[n] + alpha * sum(m.bert.state_dict()[n] - base[n] for m in fine.values()) for n in base}
    for n, w in model.state_dict().items():
        assert torch.allclose(w, merged[n], atol=1e-6), n
    texts = ["a really great movie", "the film was awful", "the coach and the ball", "a vote on the law today"]
    for task, ft in fine.items():
        folder = out / "sequence-classification" / task
        clf, log = transformers_log(lambda: AutoModelForSequenceClassification.from_pretrained(folder))
        assert "MISSING" not in log and "newly initialized" not in log, (task, log)
        assert clf.config.id2label == ft.config.id2label
        # the exported classifier is base + α Σ τ on the backbone with the task's own head
        ft.bert.load_state_dict(merged)
        batch = AutoTokenizer.from_pretrained(folder)(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            torch.testing.assert_close(clf.eval()(**batch).logits, ft(**batch).logits, atol=1e-5, rtol=1e-5)
    assert fine["sentiment"].config.id2label == {0: "positive", 1: "negative"}
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
    zips = [zip_folder(bert["base"], work / "base.zip")]
    zips += [zip_folder(folder, work / f"{task}.zip") for task, folder in bert["tasks"].items()]
    res = drive_own(bert, work / "cache", work / "merged", args.out, work / "streamlit.log", uploads=zips)
    print(res["screenshots"])
    shutil.rmtree(work, ignore_errors=True)
