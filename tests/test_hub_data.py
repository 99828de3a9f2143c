"""Hugging Face datasets as task data: files written by `datasets` itself, in the hub's layouts
(`nyu-mll/glue`'s per-config parquet shards, a local hub cache) and as `save_to_disk` folders."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from st.errors import UserError
from st.tasks import get_task
from tests.conftest import NEGATIVE, POSITIVE, WORDS

datasets = pytest.importorskip("datasets")
ClassLabel, Dataset, DatasetDict, Features, Value = (
    datasets.ClassLabel,
    datasets.Dataset,
    datasets.DatasetDict,
    datasets.Features,
    datasets.Value,
)

pytestmark = pytest.mark.usefixtures("one_thread", "hf_offline")


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """A fresh, empty HF cache and no hub: every test reads only what it wrote."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_home" / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    # the libraries read their environment once, at import: point the already imported ones here too
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def sentence(rng, positive: bool) -> str:
    words = rng.sample(WORDS[8:], 3) + [rng.choice(POSITIVE if positive else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def pairs(n: int, seed: int):
    """(premise, hypothesis, entailed) rows: entailed when both carry the same sentiment."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.random() < 0.5, rng.random() < 0.5
        rows.append((sentence(rng, a), sentence(rng, b), a == b))
    return rows


def write_split(folder: Path, split: str, columns: dict, features: Features, shards: int = 1) -> None:
    """One split as the hub stores it: `{split}-0000i-of-0000N.parquet`, written by `datasets`."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = Dataset.from_dict(columns, features=features)
    for i in range(shards):
        ds.shard(shards, i, contiguous=True).to_parquet(str(folder / f"{split}-{i:05d}-of-{shards:05d}.parquet"))


def write_rte(root: Path, n_train: int = 96, n_dev: int = 32, test_idx=(2, 0, 1)) -> Path:
    """nyu-mll/glue's rte/ folder: sentence1, sentence2, label (ClassLabel), idx; test labels are -1."""
    features = Features(
        sentence1=Value("string"),
        sentence2=Value("string"),
        label=ClassLabel(names=["entailment", "not_entailment"]),
        idx=Value("int32"),
    )
    for split, n, seed in (("train", n_train, 0), ("validation", n_dev, 1)):
        rows = pairs(n, seed)
        columns = {
            "sentence1": [a for a, _, _ in rows],
            "sentence2": [b for _, b, _ in rows],
            "label": [0 if same else 1 for *_, same in rows],
            "idx": list(range(n)),
        }
        write_split(root / "rte", split, columns, features, shards=2 if split == "train" else 1)
    rows = pairs(len(test_idx), 2)
    columns = {
        "sentence1": [a for a, _, _ in rows],
        "sentence2": [b for _, b, _ in rows],
        "label": [-1] * len(rows),
        "idx": list(test_idx),
    }
    write_split(root / "rte", "test", columns, features)
    return root


def write_sst2(root: Path, n_train: int = 96, n_dev: int = 32) -> Path:
    features = Features(sentence=Value("string"), label=ClassLabel(names=["negative", "positive"]), idx=Value("int32"))
    rng = random.Random(3)
    for split, n in (("train", n_train), ("validation", n_dev), ("test", 4)):
        labels = [rng.random() < 0.5 for _ in range(n)]
        columns = {
            "sentence": [sentence(rng, y) for y in labels],
            "label": [int(y) if split != "test" else -1 for y in labels],
            "idx": list(range(n)),
        }
        write_split(root / "sst2", split, columns, features)
    return root


def write_mnli(root: Path) -> Path:
    """mnli/: premise, hypothesis, label in the hub's order (entailment, neutral, contradiction)."""
    features = Features(
        premise=Value("string"),
        hypothesis=Value("string"),
        label=ClassLabel(names=["entailment", "neutral", "contradiction"]),
        idx=Value("int32"),
    )
    splits = {
        "train": 96,
        "validation_matched": 24,
        "validation_mismatched": 24,
        "test_matched": 3,
        "test_mismatched": 3,
    }
    for i, (split, n) in enumerate(splits.items()):
        rows = pairs(n, 10 + i)
        rng = random.Random(i)
        columns = {
            "premise": [a for a, _, _ in rows],
            "hypothesis": [b for _, b, _ in rows],
            "label": [-1 if split.startswith("test") else (0 if same else rng.choice([1, 2])) for *_, same in rows],
            "idx": list(range(n)),
        }
        write_split(root / "mnli", split, columns, features)
    rows = pairs(2, 20)  # GLUE's diagnostic set: its own config, scored with the MNLI model
    columns = {"premise": [r[0] for r in rows], "hypothesis": [r[1] for r in rows], "label": [-1, -1], "idx": [0, 1]}
    write_split(root / "ax", "test", columns, features)
    return root


def run(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def finetune(model: Path, out: Path, *data, epochs: int = 2, extra=()):
    args = ("finetune", *data, "--model", model, "--epochs", epochs, "--batch-size", 16, "--lr", 1e-3)
    run(*args, *extra, "--out", out)
    return json.loads((out / "metrics.json").read_text())


# ---- GLUE from the hub's parquet layout --------------------------------------------------------------


def test_rte_from_hub_parquet_reads_labels_idx_and_unlabelled_test(tmp_path):
    root = write_rte(tmp_path / "glue")
    for data_dir in (root, root / "rte"):  # the repo root or the config's folder
        task = get_task("rte", data_dir=str(data_dir))
        train, dev, test = task.load("train"), task.load("dev"), task.load("test")
        assert (len(train), len(dev), len(test)) == (96, 32, 3)  # both train shards
        assert {e.label for e in train} == {0, 1} and task.labels == ("entailment", "not_entailment")
        assert [e.guid for e in test] == ["2", "0", "1"] and all(e.label is None for e in test)
        assert train[0].text_b is not None


def test_mnli_hub_labels_map_by_name_and_dev_splits(tmp_path):
    root = write_mnli(tmp_path / "glue")
    task = get_task("mnli", data_dir=str(root))
    hub = datasets.load_dataset("parquet", data_files={"v": str(root / "mnli" / "validation_matched-*.parquet")})["v"]
    dev = task.load("dev_matched")
    names = hub.features["label"].names
    # the hub's index 0 is entailment; the task's (HF run_glue's) order puts contradiction first
    assert [task.labels[e.label] for e in dev] == [names[i] for i in hub["label"]]
    assert len(task.load("dev_mismatched")) == 24 and all(e.label is None for e in task.load("test_matched"))


def test_rte_sst2_mnli_train_and_evaluate_with_a_glue_submission(tmp_path, tiny_bert_dir):
    root = write_rte(tmp_path / "glue")
    write_sst2(root)
    write_mnli(root)
    for name in ("rte", "sst2", "mnli"):
        metrics = finetune(tiny_bert_dir, tmp_path / name, "--task", name, "--data-dir", root, epochs=1)
        assert metrics["task"] == name and 0 <= metrics["dev"]["accuracy"] <= 1
        run("eval", "--checkpoint", tmp_path / name, "--split", "dev")
    # the submission: one row per test example, in the dataset's order, under its idx
    out = tmp_path / "RTE.tsv"
    run("eval", "--checkpoint", tmp_path / "rte", "--split", "test", "--predictions", out)
    lines = out.read_text().splitlines()
    assert lines[0] == "index\tprediction" and [line.split("\t")[0] for line in lines[1:]] == ["2", "0", "1"]
    assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "not_entailment"}
    run("eval", "--checkpoint", tmp_path / "mnli", "--split", "test", "--predictions", tmp_path / "MNLI.tsv")
    for split, rows in (("test_matched", 3), ("test_mismatched", 3), ("ax", 2)):
        assert len((tmp_path / f"MNLI.{split}.tsv").read_text().splitlines()) == rows + 1


def test_tsv_and_parquet_give_identical_token_ids_and_metrics(tmp_path, tiny_bert_dir):
    from st.data import encode_examples
    from st.tokenize import Tokenizer

    root = write_rte(tmp_path / "glue")
    tsv = tmp_path / "RTE"
    tsv.mkdir()
    for split, name in (("train", "train"), ("validation", "dev")):
        ds = datasets.load_dataset("parquet", data_files={"s": str(root / "rte" / f"{split}-*.parquet")})["s"]
        names = ds.features["label"].names
        lines = ["index\tsentence1\tsentence2\tlabel"]
        lines += [f"{r['idx']}\t{r['sentence1']}\t{r['sentence2']}\t{names[r['label']]}" for r in ds]
        (tsv / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    tokenizer = Tokenizer.from_dir(tiny_bert_dir, max_length=32)
    for split in ("train", "dev"):
        a = encode_examples(tokenizer, get_task("rte", data_dir=str(tsv)).load(split), regression=False)
        b = encode_examples(tokenizer, get_task("rte", data_dir=str(root)).load(split), regression=False)
        assert a.rows == b.rows and a.labels == b.labels
    from_tsv = finetune(tiny_bert_dir, tmp_path / "tsv", "--task", "rte", "--data-dir", tsv)
    from_parquet = finetune(tiny_bert_dir, tmp_path / "parquet", "--task", "rte", "--data-dir", root)
    assert from_tsv["dev"] == from_parquet["dev"] and from_tsv["epochs"][0]["dev"] == from_parquet["epochs"][0]["dev"]


# ---- the hub cache, by hub id -----------------------------------------------------------------------


def cache_snapshot(repo: str, write) -> Path:
    """`repo`'s files where `load_dataset` leaves them: HF_HUB_CACHE/datasets--owner--name/snapshots/<rev>/."""
    import os

    base = Path(os.environ["HF_HUB_CACHE"]) / f"datasets--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    return write(base / "snapshots" / revision)


def test_glue_by_hub_id_from_the_local_cache_offline(tmp_path, tiny_bert_dir):
    cache_snapshot("nyu-mll/glue", write_rte)
    task = get_task("rte", dataset="nyu-mll/glue")
    assert len(task.load("train")) == 96 and [e.guid for e in task.load("test")] == ["2", "0", "1"]
    metrics = finetune(tiny_bert_dir, tmp_path / "run", "--task", "rte", "--dataset", "nyu-mll/glue", epochs=1)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["task_options"] == {"dataset": "nyu-mll/glue"}
    assert "accuracy" in metrics["dev"]


def test_a_hub_id_not_in_the_cache_while_offline_is_one_line(tmp_path, tiny_bert_dir):
    result = run(
        "finetune",
        "--task",
        "rte",
        "--dataset",
        "nyu-mll/glue",
        "--model",
        tiny_bert_dir,
        "--out",
        tmp_path / "r",
        ok=False,
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = result.output.strip()
    assert "\n" not in message and "not in the local Hugging Face cache" in message and "offline" in message


# ---- a user's own dataset ---------------------------------------------------------------------------


def user_dataset(n: int, seed: int, features: Features | None = None) -> Dataset:
    rng = random.Random(seed)
    labels = [rng.random() < 0.5 for _ in range(n)]
    columns = {"review": [sentence(rng, y) for y in labels], "stars": [int(y) for y in labels]}
    return Dataset.from_dict(columns, features=features)


def test_a_save_to_disk_dataset_fine_tunes_with_class_label_names(tmp_path, tiny_bert_dir):
    features = Features(review=Value("string"), stars=ClassLabel(names=["bad", "good"]))
    DatasetDict(
        train=user_dataset(96, 0, features), validation=user_dataset(32, 1, features), test=user_dataset(4, 2, features)
    ).save_to_disk(str(tmp_path / "mine"))
    data = ("--task", "hf", "--data-dir", tmp_path / "mine", "--text-columns", "review", "--label-column", "stars")
    metrics = finetune(tiny_bert_dir, tmp_path / "run", *data)
    assert metrics["task"] == "hf" and len(metrics["epochs"]) == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["labels"] == ["bad", "good"]
    run("eval", "--checkpoint", tmp_path / "run", "--split", "test", "--predictions", tmp_path / "p.tsv")
    assert len((tmp_path / "p.tsv").read_text().splitlines()) == 5


def test_user_parquet_files_and_labels_from_values(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    user_dataset(40, 0).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    user_dataset(10, 1).to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    task = get_task("hf", data_dir=str(tmp_path), text_columns="review", label_column="stars")
    assert task.labels == ("0", "1") and len(task.load("dev")) == 10
    with pytest.raises(UserError, match="no test split .* its splits are: train, validation"):
        task.load("test")


def test_unknown_column_names_the_columns_there_are(tmp_path, tiny_bert_dir):
    user_dataset(20, 0).save_to_disk(str(tmp_path / "one"))  # a single Dataset: the train split
    with pytest.raises(UserError, match=r"has no column 'text' \(columns: review, stars\); pass --text-columns"):
        get_task("hf", data_dir=str(tmp_path / "one"), label_column="stars")
    result = run(
        "finetune",
        "--task",
        "hf",
        "--data-dir",
        tmp_path / "one",
        "--text-columns",
        "review",
        "--model",
        tiny_bert_dir,
        "--out",
        tmp_path / "r",
        ok=False,
    )
    assert (
        result.exit_code == 1 and "has no column 'label' (columns: review, stars); pass --label-column" in result.output
    )


def test_options_a_task_does_not_take_are_one_line(tmp_path):
    with pytest.raises(UserError, match="task rotten_tomatoes takes no --dataset"):
        get_task("rotten_tomatoes", data_dir=None, dataset="x/y")
    with pytest.raises(UserError, match="task rte takes no --text-columns"):
        get_task("rte", data_dir=None, text_columns="a")


def test_a_missing_datasets_library_says_how_to_install_it(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    user_dataset(20, 0).save_to_disk(str(tmp_path / "one"))
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UserError, match=r"install it: pip install 'st\[datasets\]'"):
        get_task("hf", data_dir=str(tmp_path / "one"), text_columns="review", label_column="stars")


def test_share_adapt_and_score_take_the_same_data_options(tmp_path, tiny_bert_dir):
    cache_snapshot("nyu-mll/glue", write_rte)
    root = write_sst2(tmp_path / "glue")
    common = ("--model", tiny_bert_dir, "--epochs", 1, "--batch-size", 16, "--lr", 1e-3)
    run("share", "--tasks", "rte,sst2", "--dataset", "rte=nyu-mll/glue", "--data-dir", f"sst2={root}", "--no-tickets",
        *common, "--out", tmp_path / "share")  # fmt: skip
    result = json.loads((tmp_path / "share" / "metrics.json").read_text())
    assert set(result["dev"]) == {"rte", "sst2"}
    run("adapt", "--task", "rte", "--dataset", "nyu-mll/glue:rte", "--fractions", "0.5", *common,
        "--out", tmp_path / "adapt")  # fmt: skip
    assert json.loads((tmp_path / "adapt" / "results.json").read_text())["rows"][0]["fraction"] == 0.5
    finetune(tiny_bert_dir, tmp_path / "ft", "--task", "sst2", "--data-dir", root, epochs=1)
    run("score", "--checkpoint", tmp_path / "ft", "--out", tmp_path / "scores.json")
    assert json.loads((tmp_path / "scores.json").read_text())["num_examples"] == 96


# ---- layouts and options the audit found wanting ----------------------------------------------------


def test_shard_names_with_a_hash_are_not_split_names(tmp_path):
    # older push_to_hub wrote data/{split}-0000i-of-0000N-{hash}.parquet
    data = tmp_path / "mine" / "data"
    data.mkdir(parents=True)
    train = user_dataset(40, 0)
    for i in range(2):
        train.shard(2, i, contiguous=True).to_parquet(str(data / f"train-{i:05d}-of-00002-5d5fd3a1b2c4e6f8.parquet"))
    user_dataset(10, 1).to_parquet(str(data / "validation-00000-of-00001-0a1b2c3d4e5f6789.parquet"))
    task = get_task("hf", data_dir=str(tmp_path / "mine"), text_columns="review", label_column="stars")
    assert task.source.split_names() == ["train", "validation"]
    assert len(task.load("train")) == 40 and len(task.load("dev")) == 10


def test_mnli_ax_is_its_own_config_whatever_the_hub_id_or_folder_names(tmp_path):
    root = cache_snapshot("nyu-mll/glue", write_mnli)
    for dataset in ("nyu-mll/glue", "nyu-mll/glue:mnli"):  # the named config is mnli's, not ax's
        task = get_task("mnli", dataset=dataset)
        assert len(task.load("ax")) == 2 and len(task.load("test_matched")) == 3
    task = get_task("mnli", data_dir=str(root / "mnli"))  # the config's own folder: no ax beside it
    assert len(task.load("test_matched")) == 3
    with pytest.raises(UserError, match=r"holds no ax split .*; GLUE's diagnostic set is the hub's ax config: add it"):
        task.load("ax")


def test_data_dir_and_dataset_together_are_refused(tmp_path, tiny_bert_dir, monkeypatch):
    root = cache_snapshot("nyu-mll/glue", write_rte)
    both = ("--data-dir", root, "--dataset", "nyu-mll/glue")
    result = run("finetune", "--task", "rte", *both, "--model", tiny_bert_dir, "--out", tmp_path / "r", ok=False)
    message = result.output.strip()
    assert result.exit_code == 1 and "\n" not in message and "Traceback" not in result.output
    assert "both say where the data is; pass one of them" in message
    with pytest.raises(UserError, match="pass one of them"):
        get_task("hf", data_dir=str(root), dataset="nyu-mll/glue:rte", text_columns="sentence1")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "tsv"))  # a default folder is no --data-dir: the hub id is used
    assert len(get_task("rte", dataset="nyu-mll/glue").load("dev")) == 32


def test_bad_rows_are_one_line_naming_split_row_and_column(tmp_path):
    def task_of(ds):
        folder = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        DatasetDict(train=ds, validation=ds).save_to_disk(str(folder))
        return get_task("hf", data_dir=str(folder), text_columns="review", label_column="stars")

    reviews = [sentence(random.Random(i), i % 2 == 0) for i in range(6)]
    empty = Dataset.from_dict({"review": reviews[:3] + [None] + reviews[4:], "stars": [0, 1] * 3})
    with pytest.raises(UserError, match=r"\(validation\), row 3: the 'review' column is empty \(null\); fill it in"):
        task_of(empty).load("dev")
    listed = Dataset.from_dict({"review": [[w] for w in reviews], "stars": [0, 1] * 3})
    with pytest.raises(UserError, match=r"\(train\), row 0: the 'review' column holds a list .*, not text"):
        task_of(listed).load("train")
    numbers = Dataset.from_dict({"review": [7, 8, 9, 10, 11, 12], "stars": [0, 1] * 3})
    assert [e.text_a for e in task_of(numbers).load("train")][:2] == ["7", "8"]  # as the jsonl tasks read them
    # a ClassLabel whose names lost one: index 2 has no name (datasets checks no range on a cast)
    labels = Dataset.from_dict({"review": reviews, "stars": [0, 1, 0, 1, 2, 0]})
    labels = labels.cast_column("stars", ClassLabel(names=["bad", "good"]))
    with pytest.raises(UserError, match=r"\(train\), row 4: the 'stars' value 2 is not a label index \(0 to 1: bad"):
        task_of(labels).load("train")
    # the same in GLUE's hub layout (nyu-mll/glue's rte)
    root = write_rte(tmp_path / "glue", n_train=8, n_dev=4)
    ds = datasets.load_dataset("parquet", data_files={"s": str(root / "rte" / "validation-*.parquet")})["s"]
    for path in (root / "rte").glob("validation-*.parquet"):
        path.unlink()
    labels = ds.cast_column("label", Value("int64")).map(lambda r, i: {"label": 5 if i == 1 else r["label"]},
                                                         with_indices=True)  # fmt: skip
    labels.cast_column("label", ClassLabel(names=["entailment", "not_entailment"])).to_parquet(
        str(root / "rte" / "validation-00000-of-00001.parquet")
    )
    with pytest.raises(UserError, match=r"\(validation\), row 1: the 'label' value 5 is not a label index"):
        get_task("rte", data_dir=str(root)).load("dev")


def test_eval_and_score_take_the_data_options_of_finetune(tmp_path, tiny_bert_dir):
    features = Features(review=Value("string"), stars=ClassLabel(names=["good", "bad"]))  # not alphabetical
    DatasetDict(train=user_dataset(32, 0, features), validation=user_dataset(16, 1, features)).save_to_disk(
        str(tmp_path / "mine")
    )
    data = ("--task", "hf", "--data-dir", tmp_path / "mine", "--text-columns", "review", "--label-column", "stars")
    finetune(tiny_bert_dir, tmp_path / "ft", *data, epochs=1)
    # the data moved: score reads it where it is now
    (tmp_path / "mine").rename(tmp_path / "moved")
    result = run("score", "--checkpoint", tmp_path / "ft", "--out", tmp_path / "s.json", ok=False)
    assert result.exit_code == 1 and "does not exist" in result.output
    run("score", "--checkpoint", tmp_path / "ft", "--data-dir", tmp_path / "moved", "--out", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["num_examples"] == 32
    # another copy, as plain parquet with other column names and string labels (sorted: bad, good)
    other = tmp_path / "other"
    other.mkdir()
    for split, n, seed in (("train", 16, 2), ("validation", 8, 3)):
        ds = user_dataset(n, seed)
        columns = {"text": ds["review"], "verdict": ["bad" if s else "good" for s in ds["stars"]]}
        Dataset.from_dict(columns).to_parquet(str(other / f"{split}.parquet"))
    evaluate = ("eval", "--checkpoint", tmp_path / "ft", "--data-dir", other, "--text-columns", "text")
    result = run(*evaluate, "--label-column", "verdict", ok=False)
    assert result.exit_code == 1 and "pass --labels in the checkpoint's order" in result.output
    result = run(*evaluate, "--label-column", "verdict", "--labels", "good,bad")
    assert "accuracy" in result.output
    score = ("score", "--checkpoint", tmp_path / "ft", "--data-dir", other, "--text-columns", "text")
    result = run(*score, "--label-column", "verdict", "--out", tmp_path / "s2.json", ok=False)
    assert result.exit_code == 1 and "pass --labels in the checkpoint's order" in result.output
    result = run(*evaluate, "--dataset", "x/y", ok=False)
    assert result.exit_code == 1 and "pass one of them" in result.output
