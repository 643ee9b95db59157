"""Own data: CSV / JSONL / folder parsing with errors naming file, row and column; seeded splits;
uploads kept in the cache; label-free measures against answers known by construction."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from analysis.errors import ValidationError
from analysis.labelfree import layer_distances, linear_cka, mean_cosine, overall_distance
from analysis.owndata import (files_in_folder, label_indices, read_file, read_task_data, resolve_data, save_upload,
                              split_indices)


def write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------- CSV / JSONL
def test_csv_and_jsonl_read_the_same_rows(tmp_path):
    csv_rows = read_file(write(tmp_path / "a.csv", 'text,label\n"good, really",pos\nbad,neg\n\n'))
    jl = read_file(write(tmp_path / "a.jsonl", '{"text": "good, really", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n'))
    for ex in (csv_rows, jl):
        assert ex.texts == ["good, really", "bad"] and ex.labels == ["pos", "neg"] and ex.splits is None
    assert csv_rows.where[1].endswith("a.csv, row 3") and jl.where[1].endswith("a.jsonl, row 3")


def test_integer_labels_from_jsonl_are_indices(tmp_path):
    ex = read_file(write(tmp_path / "i.jsonl", '{"text": "x", "label": 1}\n{"text": "y", "label": 0.0}\n'))
    y, names = label_indices(ex, ["neg", "pos"])
    assert ex.labels == ["1", "0"] and list(y) == [1, 0] and names == ["neg", "pos"]


@pytest.mark.parametrize("name, text, needle", [
    ("nolabel.csv", "text,split\nx,train\n", "has a 'split' column but no 'label' column"),
    ("notext.csv", "sentence,label\nx,a\n", "no column 'text' (found ['label', 'sentence'])"),
    ("empty.csv", "text,label\nfine,a\n  ,b\n", "empty.csv, row 3, column 'text': empty"),
    ("nolab.csv", "text,label\nfine,a\nfine too,\n", "nolab.csv, row 3, column 'label': empty"),
    ("fields.csv", "text,label\nfine,a,extra\n", "fields.csv, row 2: 3 fields, the header has 2"),
    ("split.csv", "text,label,split\nx,a,train\ny,b,holdout\n", "split.csv, row 3, column 'split': 'holdout'"),
    ("dupe.csv", "text,label,text\nx,a,y\n", "dupe.csv, row 1: column 'text' appears more than once"),
    ("bad.jsonl", '{"text": "x", "label": "a"}\n{"text": "y", label: b}\n', "bad.jsonl, row 2: not valid JSON"),
    ("list.jsonl", '["x", "a"]\n', "list.jsonl, row 1: expected a JSON object"),
    ("frac.jsonl", '{"text": "x", "label": 0.5}\n', "frac.jsonl, row 1, key 'label': 0.5 is not a class"),
    ("hdr.csv", "text,label\n", "hdr.csv: no rows"),
    ("data.txt", "text,label\nx,a\n", "must be .csv or .jsonl"),
])
def test_errors_name_file_row_and_column(tmp_path, name, text, needle):
    with pytest.raises(ValidationError) as err:
        read_file(write(tmp_path / name, text))
    assert needle in str(err.value)


def test_label_outside_the_heads_classes_names_its_row(tmp_path):
    ex = read_file(write(tmp_path / "t.csv", "text,label\nx,positive\ny,neutral\n"))
    with pytest.raises(ValidationError, match=r"t\.csv, row 3, column 'label': 'neutral' is not one of the head's "
                                              r"classes \['negative', 'positive'\] nor a class index 0\.\.1"):
        label_indices(ex, ["negative", "positive"])
    # without a head the classes are the labels seen (numbers sorted as numbers)
    ex = read_file(write(tmp_path / "n.csv", "text,label\na,10\nb,9\nc,10\n"))
    y, names = label_indices(ex)
    assert names == ["9", "10"] and list(y) == [1, 0, 1]


def test_unlabelled_text(tmp_path):
    ex = read_file(write(tmp_path / "u.csv", "text\nfirst\nsecond\n"))
    assert not ex.labelled and len(ex) == 2
    with pytest.raises(ValidationError, match="has no labels"):
        label_indices(ex)


# ---------------------------------------------------------------- splits and layouts
def _balanced(tmp_path, n=40):
    rows = "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(n))
    return read_file(write(tmp_path / "s.csv", "text,label\n" + rows))


def test_seeded_split_is_stratified_reproducible_and_seed_dependent(tmp_path):
    ex = _balanced(tmp_path)
    y, _ = label_indices(ex)
    a, b = split_indices(ex, y, "task", 0), split_indices(ex, y, "task", 0)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert sorted(np.concatenate(list(a.values()))) == list(range(40))       # a partition
    assert {s: len(v) for s, v in a.items()} == {"train": 28, "validation": 6, "test": 6}
    assert all((y[v] == 0).sum() == (y[v] == 1).sum() for v in a.values())   # 50/50 in every split
    c = split_indices(ex, y, "task", 1)
    assert not np.array_equal(a["test"], c["test"])


def test_split_column_is_kept_and_empty_splits_are_refused(tmp_path):
    ex = read_file(write(tmp_path / "c.csv", "text,label,split\na,x,train\nb,y,val\nc,x,test\nd,y,dev\n"))
    y, _ = label_indices(ex)
    parts = split_indices(ex, y, "t")
    assert [list(parts[s]) for s in ("train", "validation", "test")] == [[0], [1, 3], [2]]
    few = read_file(write(tmp_path / "few.csv", "text,label\na,x\nb,y\nc,x\n"))
    with pytest.raises(ValidationError, match="task 't' has no validation examples after splitting by the 70/15/15"):
        split_indices(few, label_indices(few)[0], "t")


def test_task_folder_and_data_folder_layouts(tmp_path):
    task = tmp_path / "data" / "sst2"
    task.mkdir(parents=True)
    write(task / "train.csv", "text,label\na,x\nb,y\n")
    write(task / "dev.jsonl", '{"text": "c", "label": "x"}\n')
    write(task / "test.csv", "text,label\nd,y\n")
    write(tmp_path / "data" / "trec.csv", "text,label\ne,q\n")
    ex = read_task_data(task)
    assert ex.texts == ["a", "b", "c", "d"] and ex.splits == ["train", "train", "validation", "test"]
    assert files_in_folder(tmp_path / "data", ["sst2", "trec", "mnli"]) == {"sst2": task,
                                                                            "trec": tmp_path / "data" / "trec.csv"}
    assert resolve_data(str(tmp_path / "data"), ["sst2", "trec"])["trec"].name == "trec.csv"
    assert resolve_data(f"trec = {tmp_path / 'data' / 'trec.csv'}", ["sst2", "trec"]) == {
        "trec": tmp_path / "data" / "trec.csv"}
    with pytest.raises(ValidationError, match="trec.csv: names no task of this set"):
        files_in_folder(tmp_path / "data", ["sst2"])
    with pytest.raises(ValidationError, match="data line for 'mnli': no task of that name"):
        resolve_data(f"mnli = {task}", ["sst2"])
    (task / "test.csv").unlink()
    with pytest.raises(ValidationError, match=r"needs train, validation and test files .* missing \['test'\]"):
        read_task_data(task)


# ---------------------------------------------------------------- uploads
def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_uploads_go_to_the_cache_by_content(tmp_path):
    root = tmp_path / "uploads"
    data = _zip({"mybert/config.json": b"{}", "mybert/model.safetensors": b"x", "__MACOSX/._config.json": b""})
    folder = save_upload("mybert.zip", data, root)
    assert folder.name == "mybert" and (folder / "config.json").is_file() and root in folder.parents
    assert save_upload("renamed.zip", data, root).parent.parent == folder.parent.parent   # same bytes, same place
    f = save_upload("head.safetensors", b"abc", root)
    assert f.read_bytes() == b"abc" and f.parent.parent == root


def test_an_uploaded_checkpoint_is_named_after_its_file():
    from analysis.owndata import upload_name
    # the browser gives a bare file name that is not on disk: the suffix goes all the same
    assert upload_name("sentiment.zip") == "sentiment" and upload_name("base.safetensors") == "base"
    assert upload_name("/x/my.task.v2.pt") == "my.task.v2" and upload_name("notes") == "notes"


@pytest.mark.parametrize("entries, needle", [
    ({"../evil/config.json": b"{}"}, "points outside the folder"),
    ({"/abs/config.json": b"{}"}, "points outside the folder"),
    ({"readme.txt": b"hi"}, "no config.json, *.safetensors or pytorch_model.bin inside"),
])
def test_bad_zips_are_refused(tmp_path, entries, needle):
    with pytest.raises(ValidationError, match=needle.replace("*", r"\*").replace(".", r"\.")):
        save_upload("m.zip", _zip(entries), tmp_path)
    assert not (tmp_path.parent / "evil").exists()


def test_upload_size_limit(tmp_path, monkeypatch):
    import analysis.owndata as od
    monkeypatch.setattr(od, "UPLOAD_LIMIT_MB", 1)
    with pytest.raises(ValidationError, match="limited to 1 MB: give the path"):
        save_upload("big.safetensors", b"0" * (2 * 2**20), tmp_path)


# ---------------------------------------------------------------- label-free measures
def test_linear_cka_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 7.0) == pytest.approx(1.0)       # rotation, scale and shift
    # centred orthonormal columns a, b: CKA([a, b], a) = ‖aᵀ[a b]‖² / (‖I₂‖_F · 1) = 1/√2
    a = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64) / 2 ** 0.5
    b = torch.tensor([0.0, 0.0, 1.0, -1.0], dtype=torch.float64) / 2 ** 0.5
    assert linear_cka(torch.stack([a, b], 1), a[:, None]) == pytest.approx(2 ** -0.5)
    assert mean_cosine(x, -2 * x) == pytest.approx(-1.0)
    with pytest.raises(ValidationError, match="same examples"):
        linear_cka(x, x[:10])


def test_layer_distances_known_answers(tiny_workspace):
    tvs = tiny_workspace.tvs
    first = tvs.tasks[0]
    own = layer_distances(tvs, tvs.task_vector(first))
    row = own[own["task"] == first]
    assert np.allclose(row["relative_distance"], 0.0) and np.allclose(row["cosine"], 1.0)
    zero = layer_distances(tvs, {n: torch.zeros(tvs.shape(n)) for n in tvs.param_names})
    assert np.allclose(zero["relative_distance"], 1.0)                   # the base: as far as it gets
    half = overall_distance(layer_distances(tvs, tvs.task_vector(first) * 0.5))
    assert half[first] == pytest.approx(0.5)
    assert set(own["depth"]) == {0, 1, "outside blocks"}                  # encoder.norm is outside the blocks
    assert list(own["task"]) == sorted(own["task"], key=tvs.tasks.index)


def test_data_folder_json_round_trip(tmp_path):
    """JSON-lines texts with quotes, commas and newlines come back unchanged."""
    rows = [{"text": 'say "hi",\nthen go', "label": "a"}, {"text": "ünïcode", "label": "b"}]
    ex = read_file(write(tmp_path / "q.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert ex.texts == [r["text"] for r in rows]
