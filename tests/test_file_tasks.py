"""The `csv` and `jsonl` tasks on small files: parsing, label sets, metrics, and every user error."""

from __future__ import annotations

import json
import re

import pytest

from st.errors import UserError
from st.tasks import Example, get_task


def write_csv(folder, split, text):
    (folder / f"{split}.csv").write_text(text, encoding="utf-8")


def write_jsonl(folder, split, rows):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def single_csv(folder):
    write_csv(folder, "train", 'sentence,label\ngreat film,pos\n"slow, dull",neg\nfine,pos\n')
    write_csv(folder, "dev", "sentence,label\nok,pos\nbad,neg\n")
    write_csv(folder, "test", "id,sentence\n17,what\n18,why\n")
    return folder


def test_csv_single_sentences(tmp_path):
    task = get_task("csv", data_dir=single_csv(tmp_path))
    assert task.name == "csv" and task.labels == ("neg", "pos") and task.num_labels == 2
    assert task.metrics == ("accuracy", "f1") and task.main_metric == "accuracy"
    assert task.load("train") == [
        Example("great film", None, 1, "2"),
        Example("slow, dull", None, 0, "3"),
        Example("fine", None, 1, "4"),
    ]
    assert task.load("test") == [Example("what", None, None, "17"), Example("why", None, None, "18")]
    task.write_predictions("test", task.load("test"), [0, 1], tmp_path / "out" / "test.tsv")
    assert (tmp_path / "out" / "test.tsv").read_text() == "index\tprediction\n17\tneg\n18\tpos\n"
    assert task.compute_metrics([1, 0], [1, 1])["accuracy"] == 0.5


def test_csv_pairs_given_labels_and_multiline_rows(tmp_path):
    write_csv(tmp_path, "train", 'premise,hypothesis,gold\n"a\nb",c,entailment\nd,e,neutral\n\nf,g,contradiction\n')
    task = get_task(
        "csv",
        data_dir=tmp_path,
        text_columns="premise, hypothesis",
        label_column="gold",
        labels="entailment,neutral,contradiction",
    )
    assert task.labels == ("entailment", "neutral", "contradiction")
    assert task.metrics == ("accuracy", "macro_f1")
    train = task.load("train")
    assert train == [
        Example("a\nb", "c", 0, "2"),
        Example("d", "e", 1, "4"),
        Example("f", "g", 2, "6"),  # line numbers are where the row starts; a blank line is skipped
    ]


def test_integer_labels_sort_numerically(tmp_path):
    write_csv(tmp_path, "train", "sentence,label\na,10\nb,2\nc,1\n")
    assert get_task("csv", data_dir=tmp_path).labels == ("1", "2", "10")


def test_jsonl_regression_and_pairs(tmp_path):
    write_jsonl(tmp_path, "train", [{"a": "x", "b": "y", "score": 3.5, "id": "p1"}, {"a": "u", "b": "v", "score": "1"}])
    write_jsonl(tmp_path, "test", [{"a": "s", "b": "t"}, ""])
    task = get_task("jsonl", data_dir=tmp_path, text_columns="a,b", label_column="score", regression=True)
    assert task.labels == () and task.num_labels == 1 and task.metrics == ("pearson", "spearman")
    assert task.load("train") == [Example("x", "y", 3.5, "p1"), Example("u", "v", 1.0, "2")]
    assert task.load("test") == [Example("s", "t", None, "1")]
    task.write_predictions("test", task.load("test"), [0.25], tmp_path / "p.tsv")
    assert (tmp_path / "p.tsv").read_text() == "index\tprediction\n1\t0.25\n"


def test_jsonl_classification_with_numeric_labels(tmp_path):
    write_jsonl(
        tmp_path, "train", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}, {"sentence": "c", "label": 2}]
    )
    task = get_task("jsonl", data_dir=tmp_path)
    assert task.labels == ("0", "1", "2") and task.metrics == ("accuracy", "macro_f1")
    assert [e.label for e in task.load("train")] == [0, 1, 2]


# ---- errors: one line, naming the file / line / column and the fix ----


def error(**options) -> str:
    with pytest.raises(UserError) as info:
        task = get_task(**options)
        for split in ("train", "dev", "test"):
            task.load(split)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_data_dir_and_files(tmp_path):
    assert "--data-dir" in error(name="csv")
    assert "does not exist" in error(name="jsonl", data_dir=tmp_path / "nope")
    message = error(name="csv", data_dir=tmp_path)
    assert str(tmp_path / "train.csv") in message and "does not exist" in message
    write_csv(tmp_path, "train", "sentence,label\na,x\nb,y\n")
    assert str(tmp_path / "dev.csv") in error(name="csv", data_dir=tmp_path)


def test_missing_columns(tmp_path):
    write_csv(tmp_path, "train", "text,label\na,x\nb,y\n")
    message = error(name="csv", data_dir=tmp_path)
    assert "train.csv" in message and "'sentence'" in message and "columns: text, label" in message
    assert "--text-columns" in message

    write_csv(tmp_path, "train", "sentence,gold\na,x\nb,y\n")
    message = error(name="csv", data_dir=tmp_path)
    assert "'label'" in message and "columns: sentence, gold" in message and "--label-column" in message

    write_jsonl(tmp_path, "train", [{"sentence": "a", "label": "x"}, {"text": "b", "label": "y"}])
    message = error(name="jsonl", data_dir=tmp_path)
    assert "train.jsonl, line 2" in message and "'sentence'" in message and "columns: text, label" in message


def test_malformed_rows(tmp_path):
    write_csv(tmp_path, "train", "sentence,label\na,x\nb,y,extra\n")
    message = error(name="csv", data_dir=tmp_path)
    assert "train.csv, line 3" in message and "3 fields where the header has 2" in message

    write_jsonl(tmp_path, "train", [{"sentence": "a", "label": "x"}, '{"sentence": "b", "label": '])
    message = error(name="jsonl", data_dir=tmp_path)
    assert "train.jsonl, line 2" in message and "invalid JSON" in message

    write_jsonl(tmp_path, "train", [{"sentence": "a", "label": "x"}, [1, 2]])
    assert "line 2: expected a JSON object" in error(name="jsonl", data_dir=tmp_path)

    write_csv(tmp_path, "train", "")
    assert "is empty" in error(name="csv", data_dir=tmp_path)


def test_label_outside_the_label_set(tmp_path):
    single_csv(tmp_path)
    write_csv(tmp_path, "dev", "sentence,label\nok,pos\nhm,neutral\n")
    message = error(name="csv", data_dir=tmp_path)
    assert re.search(r"dev\.csv, line 3: label 'neutral' is not one of neg, pos", message) and "--labels" in message

    message = error(name="csv", data_dir=tmp_path, labels="neg,pos,neutral,pos")
    assert "repeats a label" in message

    write_csv(tmp_path, "dev", "sentence,label\nok,\n")
    assert "dev.csv, line 2: the 'label' field is empty" in error(name="csv", data_dir=tmp_path)


def test_single_label_and_option_errors(tmp_path):
    write_csv(tmp_path, "train", "sentence,label\na,x\nb,x\n")
    assert "at least two" in error(name="csv", data_dir=tmp_path)
    assert "--text-columns" in error(name="csv", data_dir=tmp_path, text_columns="a,b,c")
    assert "--regression" in error(name="csv", data_dir=tmp_path, regression=True, labels="a,b")


def test_non_numeric_regression_label(tmp_path):
    write_csv(tmp_path, "train", "sentence,label\na,0.5\nb,high\n")
    message = error(name="csv", data_dir=tmp_path, regression=True)
    assert "train.csv, line 3" in message and "'high'" in message and "not a finite number" in message
    write_jsonl(tmp_path, "train", [{"sentence": "a", "label": True}])
    assert "train.jsonl, line 1" in error(name="jsonl", data_dir=tmp_path, regression=True)
