"""GLUE, SNLI and SciTail readers on tiny files written in the official layouts."""

from __future__ import annotations

import json
import math
import re

import pytest

from st.errors import UserError
from st.tasks import TASKS, get_task, register_task

T = "\t"


def row(*fields) -> str:
    return T.join(str(f) for f in fields) + "\n"


# MNLI/SNLI parse columns are long in the real files; their content does not matter to the reader.
PARSES = (
    "( ( A man ) sleeps )",
    "( ( A man ) naps )",
    "(ROOT (S (NP (DT A) (NN man)) (VP (VBZ sleeps))))",
    "(ROOT (S (NP (DT A) (NN man)) (VP (VBZ naps))))",
)
MNLI_HEAD = (
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
)

# Per task folder: file -> content, as download_glue_data.py (or the official archive) leaves them.
FILES = {
    "CoLA": {
        # train/dev: no header; source, label, original "*" mark, sentence.
        "train.tsv": row("gj04", 1, "", "Our friends won't buy this analysis, let alone the next one we propose.")
        + row("gj04", 0, "*", "They drank the pub."),
        "dev.tsv": row("gj04", 1, "", "The sailors rode the breeze clear of the rocks.")
        + row("clc95", 0, "*", "The more you eat, the most you want."),
        "test.tsv": row("index", "sentence")
        + row(0, "Bill whistled past the house.")
        + row(1, "The car honked its way down the road."),
    },
    "SST-2": {
        "train.tsv": row("sentence", "label")
        + row("hide new secretions from the parental units ", 0)
        + row("that loves its characters ", 1),
        "dev.tsv": row("sentence", "label") + row("it 's a charming and often affecting journey . ", 1),
        "test.tsv": row("index", "sentence") + row(0, "uneasy mishmash of styles and genres ."),
    },
    "MRPC": {
        # Header copied from msr_paraphrase_train.txt (BOM included); the text has unbalanced quotes.
        "train.tsv": "\ufeff"
        + row("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
        + row(
            1,
            702876,
            702977,
            'Amrozi accused his brother , whom he called " the witness " , of deliberately',
            'Referring to him as only " the witness , Amrozi accused his brother',
        )
        + row(0, 2108705, 2108831, "Yucaipa owned Dominick 's before selling .", "Yucaipa bought Dominick 's ."),
        "dev.tsv": row("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
        + row(
            1,
            1355540,
            1355592,
            "He said the foodservice pie business doesn 't fit .",
            "The pie business doesn 't fit .",
        ),
        "test.tsv": row("index", "#1 ID", "#2 ID", "#1 String", "#2 String")
        + row(
            0, 1089874, 1089925, "PCCW 's chief operating officer will report to Mr So .", "Butcher will report to So ."
        ),
    },
    "STS-B": {
        "train.tsv": row(
            "index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"
        )
        + row(
            0,
            "main-captions",
            "MSRvid",
            "2012test",
            "0001",
            "none",
            "none",
            "A plane is taking off.",
            "An air plane is taking off.",
            "5.000",
        )
        + row(
            1,
            "main-captions",
            "MSRvid",
            "2012test",
            "0004",
            "none",
            "none",
            "A man is playing a flute.",
            "A man is playing a bamboo flute.",
            "3.800",
        ),
        "dev.tsv": row(
            "index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"
        )
        + row(
            0,
            "main-captions",
            "MSRvid",
            "2012test",
            "0000",
            "none",
            "none",
            "A man with a hard hat is dancing.",
            "A man wearing a hard hat is dancing.",
            "5.000",
        ),
        "test.tsv": row(
            "index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"
        )
        + row(
            0,
            "main-captions",
            "MSRvid",
            "2012test",
            "0024",
            "none",
            "none",
            "A girl is styling her hair.",
            "A girl is brushing her hair.",
        )
        + row(
            1,
            "main-captions",
            "MSRvid",
            "2012test",
            "0033",
            "none",
            "none",
            "A group of men play soccer.",
            "A group of boys play soccer.",
        ),
    },
    "QQP": {
        "train.tsv": row("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
        + row(133273, 213221, 213222, "How is the life of a math student?", "Which level of prepration is enough?", 0)
        + row(402555, 536040, 536041, 'How do I control my "horny" emotions?', "How do you control your horniness?", 1),
        "dev.tsv": row("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
        + row(201359, 303345, 303346, "Why are African-Americans so beautiful?", "Why are hispanics so beautiful?", 0),
        "test.tsv": row("id", "question1", "question2")
        + row(
            0, "Why am I mentally very lonely? How can I solve it?", "Find the remainder when 23^24 is divided by 24"
        ),
    },
    "MNLI": {
        "train.tsv": row(*MNLI_HEAD, "label1", "gold_label")
        + row(
            0,
            31193,
            "31193n",
            "government",
            *PARSES,
            "Conceptually cream skimming has two basic dimensions.",
            "Product and geography are what make cream skimming work. ",
            "neutral",
            "neutral",
        )
        + row(
            1,
            101457,
            "101457e",
            "telephone",
            *PARSES,
            "you know during the season i guess",
            "You lose the things to the following level.",
            "entailment",
            "entailment",
        ),
        # dev: five annotator labels, then the gold one (which need not be label1).
        "dev_matched.tsv": row(*MNLI_HEAD, "label1", "label2", "label3", "label4", "label5", "gold_label")
        + row(
            0,
            63735,
            "63735n",
            "slate",
            *PARSES,
            "The new rights are nice enough",
            "Everyone really likes the newest benefits ",
            "neutral",
            "entailment",
            "neutral",
            "neutral",
            "neutral",
            "neutral",
        )
        + row(
            1,
            91383,
            "91383c",
            "government",
            *PARSES,
            "This site includes a list of all award winners.",
            "The Government Executive articles housed on the website are not able to be searched.",
            "contradiction",
            "contradiction",
            "entailment",
            "contradiction",
            "contradiction",
            "contradiction",
        ),
        "dev_mismatched.tsv": row(*MNLI_HEAD, "label1", "label2", "label3", "label4", "label5", "gold_label")
        + row(
            0,
            75290,
            "75290c",
            "letters",
            *PARSES,
            "Your contribution helped make it possible.",
            "Your contributions were of no help.",
            "contradiction",
            "contradiction",
            "contradiction",
            "contradiction",
            "contradiction",
            "contradiction",
        ),
        "test_matched.tsv": row(*MNLI_HEAD)
        + row(0, 31493, 31493, "travel", *PARSES, "Hierbas is usually taken after a meal.", "Frambuesa is a meal."),
        "test_mismatched.tsv": row(*MNLI_HEAD)
        + row(0, 0, 0, "letters", *PARSES, "What we do is rewarding.", "We are working hard."),
    },
    "diagnostic": {
        "diagnostic.tsv": row("index", "sentence1", "sentence2")
        + row(0, "The cat sat on the mat.", "The cat did not sit on the mat.")
    },
    "QNLI": {
        "train.tsv": row("index", "question", "sentence", "label")
        + row(
            0, "When did the third Digimon series begin?", "Digimon Tamers takes a darker approach.", "not_entailment"
        )
        + row(
            1,
            "What two things does Popper argue Tarski's theory involves?",
            "Popper argues it involves two things.",
            "entailment",
        ),
        "dev.tsv": row("index", "question", "sentence", "label")
        + row(0, "What came into force?", "It did.", "entailment"),
        "test.tsv": row("index", "question", "sentence") + row(0, "What is a bird?", "A bird is an animal."),
    },
    "RTE": {
        "train.tsv": row("index", "sentence1", "sentence2", "label")
        + row(
            0,
            "No Weapons of Mass Destruction Found in Iraq Yet.",
            "Weapons of Mass Destruction Found in Iraq.",
            "not_entailment",
        ),
        "dev.tsv": row("index", "sentence1", "sentence2", "label")
        + row(0, "Dana Reeve, the widow of the actor, died.", "Christopher Reeve had an accident.", "not_entailment")
        + row(
            1,
            "Yet, we now are discovering that antibiotics are losing their effectiveness.",
            "Bacteria is winning the war against antibiotics.",
            "entailment",
        ),
        "test.tsv": row("index", "sentence1", "sentence2")
        + row(0, "Mangla was an Indian politician.", "Mangla was Indian.")
        + row(1, "Three days later, he died.", "He died."),
    },
    "WNLI": {
        "train.tsv": row("index", "sentence1", "sentence2", "label")
        + row(
            0, "I stuck a pin through a carrot. When I pulled the pin out, it had a hole.", "The carrot had a hole.", 1
        ),
        "dev.tsv": row("index", "sentence1", "sentence2", "label")
        + row(0, "The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", 0),
        "test.tsv": row("index", "sentence1", "sentence2") + row(0, "Maude and Dora had seen the trains.", "Dora had."),
    },
}


def write_glue(root, files=FILES):
    for folder, contents in files.items():
        for name, text in contents.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / name).write_text(text, encoding="utf-8")
    return root


def snli_line(gold, s1, s2, pair):
    return (
        json.dumps(
            {
                "annotator_labels": [gold],
                "captionID": pair[:-3],
                "gold_label": gold,
                "pairID": pair,
                "sentence1": s1,
                "sentence1_binary_parse": PARSES[0],
                "sentence1_parse": PARSES[2],
                "sentence2": s2,
                "sentence2_binary_parse": PARSES[1],
                "sentence2_parse": PARSES[3],
            }
        )
        + "\n"
    )


@pytest.fixture
def glue_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    return write_glue(tmp_path)


def load(name, split):
    return get_task(name).load(split)


def test_all_tasks_registered_with_their_attributes():
    assert {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "snli", "scitail"} <= set(TASKS)
    mnli, cola, stsb, mrpc = (get_task(n, data_dir=None) for n in ("mnli", "cola", "stsb", "mrpc"))
    assert mnli.labels == ("contradiction", "entailment", "neutral") and mnli.num_labels == 3
    assert mnli.dev_splits == ("dev_matched", "dev_mismatched")
    assert mnli.test_splits == ("test_matched", "test_mismatched", "ax")
    assert (mnli.head_dropout, cola.head_dropout, mrpc.head_dropout) == (0.2, 0.05, 0.1)
    assert cola.metrics == ("mcc",) and cola.main_metric == "mcc"
    assert stsb.labels == () and stsb.num_labels == 1 and stsb.metrics == ("pearson", "spearman")
    assert mrpc.metrics == ("accuracy", "f1") and mrpc.main_metric == "accuracy"
    assert get_task("rte").labels == get_task("qnli").labels == ("entailment", "not_entailment")
    assert get_task("scitail").labels == ("entails", "neutral")


def test_cola_headerless_train_and_headed_test(glue_dir):
    train = load("cola", "train")
    assert [(e.text_a, e.text_b, e.label) for e in train] == [
        ("Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
        ("They drank the pub.", None, 0),
    ]
    assert [e.guid for e in train] == ["1", "2"]  # no id column: the line number
    test = load("cola", "test")
    assert [(e.guid, e.text_a, e.label) for e in test] == [
        ("0", "Bill whistled past the house.", None),
        ("1", "The car honked its way down the road.", None),
    ]


def test_sst2_keeps_text_verbatim(glue_dir):
    assert [(e.text_a, e.label) for e in load("sst2", "train")] == [
        ("hide new secretions from the parental units ", 0),
        ("that loves its characters ", 1),
    ]
    assert load("sst2", "test")[0].guid == "0"


def test_mrpc_pairs_quotes_and_bom(glue_dir):
    train = load("mrpc", "train")
    assert train[0].label == 1 and train[1].label == 0
    assert train[0].text_a.endswith('whom he called " the witness " , of deliberately')
    assert train[0].text_b == 'Referring to him as only " the witness , Amrozi accused his brother'
    test = load("mrpc", "test")
    assert (test[0].guid, test[0].label, test[0].text_b) == ("0", None, "Butcher will report to So .")


def test_stsb_float_scores(glue_dir):
    train = load("stsb", "train")
    assert [(e.text_a, e.text_b, e.label, e.guid) for e in train] == [
        ("A plane is taking off.", "An air plane is taking off.", 5.0, "0"),
        ("A man is playing a flute.", "A man is playing a bamboo flute.", 3.8, "1"),
    ]
    assert [e.label for e in load("stsb", "test")] == [None, None]


def test_qqp_ids_and_test_columns(glue_dir):
    train = load("qqp", "train")
    assert [(e.guid, e.label) for e in train] == [("133273", 0), ("402555", 1)]
    assert train[1].text_a == 'How do I control my "horny" emotions?'
    test = load("qqp", "test")
    assert (test[0].guid, test[0].text_a, test[0].label) == (
        "0",
        "Why am I mentally very lonely? How can I solve it?",
        None,
    )


def test_mnli_train_two_dev_sets_two_test_sets_and_diagnostic(glue_dir):
    train = load("mnli", "train")
    assert [e.label for e in train] == [2, 1]
    assert train[0].text_b == "Product and geography are what make cream skimming work. "
    matched = load("mnli", "dev_matched")
    assert [e.label for e in matched] == [2, 0]  # the gold label, not label1..label5
    assert matched[1].text_a == "This site includes a list of all award winners."
    mismatched = load("mnli", "dev_mismatched")
    assert [(e.label, e.text_a) for e in mismatched] == [(0, "Your contribution helped make it possible.")]
    test_m, test_mm, ax = (load("mnli", s) for s in ("test_matched", "test_mismatched", "ax"))
    assert (test_m[0].label, test_m[0].text_b) == (None, "Frambuesa is a meal.")
    assert test_mm[0].text_a == "What we do is rewarding."
    assert (ax[0].guid, ax[0].text_b, ax[0].label) == ("0", "The cat did not sit on the mat.", None)


def test_data_dir_may_be_the_glue_root_or_the_task_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    root = write_glue(tmp_path / "glue")
    for name, folder in (("rte", "RTE"), ("sst2", "SST-2"), ("cola", "CoLA"), ("mnli", "MNLI"), ("stsb", "STS-B")):
        task = get_task(name, data_dir=root)
        for split in ("train", *task.dev_splits):
            examples = task.load(split)
            assert examples and examples == get_task(name, data_dir=root / folder).load(split), (name, split)
    assert get_task("mnli", data_dir=root).load("ax")[0].text_b == "The cat did not sit on the mat."
    with pytest.raises(UserError) as e:
        get_task("rte", data_dir=tmp_path / "elsewhere").load("train")
    message = str(e.value)
    assert (
        str(tmp_path / "elsewhere" / "train.tsv") in message
        and str(tmp_path / "elsewhere" / "RTE" / "train.tsv") in message
    )
    assert "GLUE root" in message and "\n" not in message


def test_qnli_rte_wnli(glue_dir):
    assert [e.label for e in load("qnli", "train")] == [1, 0]
    assert load("qnli", "train")[0].text_a == "When did the third Digimon series begin?"
    assert [e.label for e in load("rte", "dev")] == [1, 0]
    assert [e.guid for e in load("rte", "test")] == ["0", "1"]
    assert [(e.text_b, e.label) for e in load("wnli", "train")] == [("The carrot had a hole.", 1)]


def test_snli_official_jsonl_drops_no_consensus(tmp_path):
    folder = tmp_path / "snli_1.0"  # the official archive's folder; also found inside data_dir
    folder.mkdir()
    for split in ("train", "dev", "test"):
        (folder / f"snli_1.0_{split}.jsonl").write_text(
            snli_line(
                "neutral",
                "A person on a horse jumps over a broken down airplane.",
                "A person is training his horse for a competition.",
                "3416050480.jpg#4r1n",
            )
            + snli_line("-", "Two women are embracing.", "The sisters are hugging.", "4705552913.jpg#2r1n")
            + snli_line("contradiction", "A man is sleeping.", "A man is running.", "2267923837.jpg#2r1c")
        )
    for data_dir in (folder, tmp_path):
        test = get_task("snli", data_dir=data_dir).load("test")
        assert [(e.label, e.guid) for e in test] == [(2, "3416050480.jpg#4r1n"), (0, "2267923837.jpg#2r1c")]
        assert test[0].text_b == "A person is training his horse for a competition."


def test_scitail_tsv_format_folder_or_parent(tmp_path):
    tsv = tmp_path / "SciTailV1.1" / "tsv_format"
    tsv.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (tsv / f"scitail_1.0_{split}.tsv").write_text(
            row(
                "Pluto rotates once on its axis every 6.39 Earth days.",
                "Earth rotates on its axis once a day.",
                "neutral",
            )
            + row("A solution is a homogeneous mixture.", "A solution is a mixture.", "entails")
        )
    for data_dir in (tsv, tsv.parent):
        dev = get_task("scitail", data_dir=data_dir).load("dev")
        assert [(e.label, e.guid) for e in dev] == [(1, "1"), (0, "2")]
        assert dev[1].text_a == "A solution is a homogeneous mixture."


def test_submission_files(glue_dir, tmp_path):
    mnli = get_task("mnli")
    assert [mnli.submission_name(s) for s in mnli.test_splits] == ["MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"]
    names = {
        n: get_task(n).submission_name("test") for n in ("cola", "sst2", "mrpc", "stsb", "qqp", "qnli", "rte", "wnli")
    }
    assert names == {
        "cola": "CoLA.tsv",
        "sst2": "SST-2.tsv",
        "mrpc": "MRPC.tsv",
        "stsb": "STS-B.tsv",
        "qqp": "QQP.tsv",
        "qnli": "QNLI.tsv",
        "rte": "RTE.tsv",
        "wnli": "WNLI.tsv",
    }

    rte = get_task("rte")
    out = tmp_path / "submit" / rte.submission_name("test")
    rte.write_predictions("test", rte.load("test"), [1, 0], out)
    assert out.read_text() == "index\tprediction\n0\tnot_entailment\n1\tentailment\n"

    stsb = get_task("stsb")
    out = tmp_path / "submit" / "STS-B.tsv"
    stsb.write_predictions("test", stsb.load("test"), [5.31, 2.71828], out)
    assert out.read_text() == "index\tprediction\n0\t5.000\n1\t2.718\n"


def test_metrics_match_hand_computed_values():
    # predictions [1,1,0,0] vs labels [1,0,0,0]: TP=1, FP=1, TN=2, FN=0.
    mcc = (1 * 2 - 1 * 0) / math.sqrt((1 + 1) * (1 + 0) * (2 + 1) * (2 + 0))
    assert get_task("cola").compute_metrics([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx({"mcc": mcc})
    precision, recall = 1 / 2, 1 / 1
    assert get_task("mrpc").compute_metrics([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(
        {"accuracy": 3 / 4, "f1": 2 * precision * recall / (precision + recall)}
    )
    # x = [1,2,3], y = [1,2,4]: deviations [-1,0,1] and [-4/3,-1/3,5/3]; cov 3, sums of squares 2 and 42/9.
    assert get_task("stsb").compute_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(
        {"pearson": 3 / math.sqrt(2 * 42 / 9), "spearman": 1.0}
    )


def test_missing_glue_dir(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(UserError, match="pass --data-dir or set GLUE_DIR"):
        get_task("rte").load("train")


def test_missing_file_names_full_path(glue_dir):
    (glue_dir / "RTE" / "dev.tsv").unlink()
    with pytest.raises(UserError) as e:
        load("rte", "dev")
    assert str(glue_dir / "RTE" / "dev.tsv") in str(e.value)
    with pytest.raises(UserError, match=r"diagnostic/diagnostic\.tsv"):
        get_task("mnli", data_dir=glue_dir / "elsewhere" / "MNLI").load("ax")


def test_malformed_row_names_file_and_line(glue_dir):
    path = glue_dir / "QQP" / "train.tsv"
    # A question with a raw newline, as in the pre-"clean" QQP release: the row is split in two.
    path.write_text(FILES["QQP"]["train.tsv"] + row(9, 10, 11, "Was Muhammad") + row("real?", 0))
    with pytest.raises(UserError, match=re.escape(f"{path}:4: 4 tab-separated columns, expected 6")) as e:
        load("qqp", "train")
    assert "\n" not in str(e.value)


def test_bad_label_names_file_line_label_and_allowed(glue_dir):
    path = glue_dir / "RTE" / "train.tsv"
    path.write_text(FILES["RTE"]["train.tsv"] + row(1, "A dog barks.", "An animal barks.", "entails"))
    with pytest.raises(
        UserError, match=re.escape(f"{path}:3: label 'entails' is not one of entailment, not_entailment")
    ):
        load("rte", "train")
    path = glue_dir / "STS-B" / "dev.tsv"
    path.write_text(FILES["STS-B"]["dev.tsv"].replace("5.000", "high"))
    with pytest.raises(UserError, match=re.escape(f"{path}:2: score 'high' is not a number")):
        load("stsb", "dev")


def test_labelled_split_without_label_column(glue_dir):
    # A test file put where the dev file belongs: dev must be labelled.
    (glue_dir / "QNLI" / "dev.tsv").write_text(FILES["QNLI"]["test.tsv"])
    with pytest.raises(UserError, match="no 'label' column"):
        load("qnli", "dev")


def test_unknown_split_lists_valid_ones(glue_dir):
    with pytest.raises(UserError, match="dev_matched, dev_mismatched"):
        load("mnli", "dev")
    with pytest.raises(UserError, match="train, dev, test"):
        get_task("sst2").submission_name("validation")


def test_registering_a_name_twice_raises():
    before = dict(TASKS)
    with pytest.raises(ValueError, match="already registered"):
        register_task("mnli")(object)
    assert TASKS == before
