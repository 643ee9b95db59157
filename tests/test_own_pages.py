"""Every page on a user's own tiny BERT (tests/tinybert.py) under AppTest: with labelled data the
pages work as on the demo; with unlabelled text only, Merge shows label-free comparisons and the
Report lists them and exports the merged model."""
from __future__ import annotations

import pytest
from pagetest import run_page

from analysis.owndata import SPLIT_RULE, read_task_data
from analysis.ownset import build_evaluation, open_hf_set
from ui.state import Workspace


def _workspace(bert, labelled: bool, tmp_path=None) -> Workspace:
    import tinybert
    own = open_hf_set(bert["base"], bert["tasks"])
    if labelled:
        data = {t: read_task_data(p) for t, p in bert["data"].items()}
    else:
        data = {t: read_task_data(tinybert.write_csv(tmp_path / f"{t}.csv", tinybert.texts_for(t, 16, 3),
                                                     labelled=False)) for t in bert["tasks"]}
    ev = build_evaluation(own, data, max_length=16, device="cpu")
    return Workspace(name="base", tvs=own.tvs, evaluator=ev.evaluator,
                     reference=ev.reference if len(ev.reference) else None,
                     extras={"own": own, "own_cards": ev.cards, "hf_base": str(own.base), "labelfree": ev.labelfree,
                             "heads": {**own.heads, **ev.heads}, "split_rule": SPLIT_RULE.format(seed=0),
                             "head_usage": "logits = pooler_output @ W.T + b"})


@pytest.mark.parametrize("page", ["1_Spectra.py", "2_Interference.py", "3_Merge.py", "4_Loss_Landscape.py",
                                  "7_Curvature.py"])
def test_pages_run_on_an_own_labelled_set(tiny_bert_dir, page):
    at = run_page(page, _workspace(tiny_bert_dir, labelled=True))
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def test_label_free_merge_then_report_and_export(tiny_bert_dir, tmp_path):
    from transformers import AutoModel
    from tinybert import transformers_log
    ws = _workspace(tiny_bert_dir, labelled=False, tmp_path=tmp_path)
    assert ws.evaluator is None
    at = run_page("3_Merge.py", ws, {"method": "task_arithmetic"})
    assert not at.exception, at.exception
    text = [d.value for d in at.dataframe if "prediction_agreement" in getattr(d.value, "columns", [])]
    assert text and set(text[0]["task"]) == {"sentiment", "topic"}
    assert text[0]["prediction_agreement"].between(0, 1).all() and text[0]["linear_cka"].between(0, 1).all()
    at.slider(key="merge_task_arithmetic_alpha").set_value(0.5).run()      # a second configuration
    history = at.session_state["merge_history"]
    assert [h["knobs"]["alpha"] for h in history] == [0.3, 0.5]
    rp = run_page("5_Report.py", ws, merge_history=history)
    assert not rp.exception, rp.exception
    assert not any("Nothing to compare" in i.value for i in rp.info)
    listed = [d.value for d in rp.dataframe if "mean prediction agreement" in getattr(d.value, "columns", [])]
    assert listed and len(listed[0]) == 2
    rp.text_input(key="rp_export_dir").input(str(tmp_path / "merged"))
    rp.button(key="rp_export").click().run()
    assert not rp.exception and not rp.error, [e.value for e in rp.error]
    _, log = transformers_log(lambda: AutoModel.from_pretrained(tmp_path / "merged"))
    assert "MISSING" not in log, log
