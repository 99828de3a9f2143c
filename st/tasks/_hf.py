"""Hugging Face datasets as task data, read through the `datasets` library (the `st[datasets]` extra).

A dataset comes from one of two places (both at once is refused: one would silently lose):
  a folder (`--data-dir`)      a `save_to_disk` folder, or parquet files in the hub's layout
                               (`{config}/{split}-00000-of-00001[-hash].parquet`, `data/...`, or flat)
  a hub id (`--dataset`)       its snapshot in the local hub cache (what `load_dataset` downloaded),
                               else `datasets.load_dataset`, which reads its own cache (offline too)
                               or downloads when online
Only parquet, arrow and JSON are read (never a loading script), so a folder from elsewhere runs no code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from st.errors import UserError
from st.tasks._common import as_text

INSTALL = "pip install 'st[datasets]'"
# train-00000-of-00003 -> train; older push_to_hub added a hash: train-00000-of-00001-5d5fd3a1b2 -> train
SHARD = re.compile(r"^(?P<split>.+?)(-\d{5}-of-\d{5}(-[0-9a-f]+)?)?$")
DISK_FILES = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes (a DatasetDict, a Dataset)


def require_datasets():
    """The `datasets` module, or a one-line error saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"Hugging Face datasets are read with the `datasets` library; install it: {INSTALL}") from None
    datasets.disable_progress_bars()  # st prints its own progress; a bar per split and shard is noise
    datasets.logging.set_verbosity_error()
    return datasets


def parse_dataset(value: str) -> tuple[str, str | None]:
    """`HUB_ID[:CONFIG]` -> (hub id, config or None)."""
    repo, _, config = value.strip().partition(":")
    if not repo or repo.count("/") > 1 or " " in repo:
        raise UserError(f"--dataset {value!r} is not HUB_ID[:CONFIG]; e.g. nyu-mll/glue:rte or stanfordnlp/snli")
    return repo, config or None


@dataclass(frozen=True)
class Source:
    """Where a dataset's splits are: parquet files per split, a save_to_disk folder, or a hub id that
    `load_dataset` resolves."""

    where: str  # for messages
    parquet: tuple[tuple[str, tuple[str, ...]], ...] = ()
    disk: str | None = None
    hub: tuple[str, str | None] | None = None

    def split_names(self) -> list[str]:
        if self.parquet:
            return [name for name, _ in self.parquet]
        if self.disk:
            return list(_from_disk(self.disk))
        return list(_hub_load(self, None))

    def load(self, split: str):
        """One split as a `datasets.Dataset`; an unknown split lists the ones there are."""
        names = self.split_names()
        if split not in names:
            raise UserError(f"{self.where} has no split {split!r}; its splits are: {', '.join(names)}")
        if self.parquet:
            files = dict(self.parquet)[split]
            try:
                return require_datasets().load_dataset("parquet", data_files={split: list(files)}, split=split)
            except Exception as e:  # pyarrow and datasets raise many kinds for an unreadable file
                raise UserError(f"{files[0]} could not be read as parquet ({type(e).__name__}: {e})") from None
        if self.disk:
            return _from_disk(self.disk)[split]
        return _hub_load(self, split)


def is_dataset_folder(folder: Path, config: str | None = None) -> bool:
    """Whether `folder` holds a dataset in one of the layouts `locate` reads (file names only: no import)."""
    return _folder_source(folder, config) is not None


def check_one_source(data_dir, dataset: str | None) -> None:
    """Not both `--data-dir` and `--dataset`: either would silently win over the other."""
    if data_dir is not None and dataset:
        raise UserError(f"--data-dir {data_dir} and --dataset {dataset} both say where the data is; pass one of them")


def locate(
    data_dir: str | Path | None, dataset: str | None, config: str | None = None, *, split_config: bool = False
) -> Source:
    """The dataset behind `--data-dir` (a folder) or `--dataset` (HUB_ID[:CONFIG]); `config` is the
    default config (a GLUE task's), used when the hub id names none, or whatever it names when
    `split_config` (a split kept in a config of its own: GLUE's ax beside `nyu-mll/glue:mnli`)."""
    check_one_source(data_dir, dataset)
    if dataset:
        repo, named = parse_dataset(dataset)
        config = config if split_config else named or config
        snapshot = _cached_snapshot(repo)
        found = _folder_source(snapshot, config) if snapshot else None
        return found or Source(f"dataset {repo}" + (f":{config}" if config else ""), hub=(repo, config))
    if data_dir is None:
        raise UserError("no data: pass --data-dir (a save_to_disk or parquet folder) or --dataset HUB_ID[:CONFIG]")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise UserError(f"data dir {folder} does not exist; pass a save_to_disk folder or a folder of parquet files")
    found = _folder_source(folder, config)
    if found is None:
        raise UserError(
            f"{folder} holds no Hugging Face dataset: expected a save_to_disk folder ({' or '.join(DISK_FILES)}) "
            f"or parquet files named like train-00000-of-00001.parquet{f' in {config}/' if config else ''}"
        )
    return found


def _folder_source(folder: Path, config: str | None) -> Source | None:
    # the hub's layouts: one folder per config (nyu-mll/glue), data/ (most repos), or the files themselves
    for base in ([folder / config] if config else []) + [folder / "data", folder]:
        if any((base / name).is_file() for name in DISK_FILES):
            return Source(str(base), disk=str(base))
        files = sorted(base.glob("*.parquet")) if base.is_dir() else []
        if files:
            splits: dict[str, list[str]] = {}
            for path in files:
                splits.setdefault(SHARD.match(path.name.removesuffix(".parquet"))["split"], []).append(str(path))
            return Source(str(base), parquet=tuple((name, tuple(paths)) for name, paths in splits.items()))
    return None


def _cached_snapshot(repo: str) -> Path | None:
    """The folder of `repo`'s files in the local hub cache, where `load_dataset` put them; None when none."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # comes with datasets; without it `_hub_load` says what to install
        return None
    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _from_disk(folder: str):
    """A save_to_disk folder as {split: Dataset}; a single saved Dataset is the train split."""
    datasets = require_datasets()
    try:
        loaded = datasets.load_from_disk(folder)
    except Exception as e:  # a damaged folder: missing arrow files, bad JSON
        raise UserError(f"{folder} could not be read as a save_to_disk folder ({type(e).__name__}: {e})") from None
    return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)


def _hub_load(source: Source, split: str | None):
    """`load_dataset(hub id, config)`: one split, or {split: Dataset} when `split` is None."""
    datasets = require_datasets()
    repo, config = source.hub
    try:
        loaded = datasets.load_dataset(repo, config)
    except Exception as e:  # offline misses, unknown repos and configs all come as different kinds
        offline = datasets.config.HF_HUB_OFFLINE or getattr(datasets.config, "HF_DATASETS_OFFLINE", False)
        if offline:
            raise UserError(
                f"{source.where} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE / "
                "HF_DATASETS_OFFLINE): load it once online, or pass its files with --data-dir"
            ) from None
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{source.where} could not be loaded: {message}") from None
    return dict(loaded) if split is None else loaded[split]


# ---- columns and labels ----------------------------------------------------------------------------


def check_columns(ds, needed: Sequence[str], where: str, options: dict[str, str]) -> None:
    """Every column in `needed` is in `ds`, or one line naming the columns there are and the option to pass."""
    for name in needed:
        if name not in ds.column_names:
            raise UserError(
                f"{where} has no column {name!r} (columns: {', '.join(ds.column_names)}); "
                f"pass {options.get(name, '--text-columns')}"
            )


def class_names(ds, column: str) -> tuple[str, ...] | None:
    """The label names of a `ClassLabel` column, in index order; None for any other kind of column."""
    feature = ds.features.get(column)
    return tuple(feature.names) if isinstance(feature, require_datasets().ClassLabel) else None


def column_values(ds, name: str) -> list:
    return list(ds[name])


def text_values(ds, name: str, where: str, fix: str) -> list[str]:
    """A text column's values: numbers and booleans in their JSON spelling (as the jsonl tasks read them);
    a missing value or a list is one line naming its row (`where` names the split), with `fix`."""
    values = column_values(ds, name)
    for i, value in enumerate(values):
        if value is None or not isinstance(value, (str, bool, int, float)):
            what = (
                "is empty (null)" if value is None else f"holds a {type(value).__name__} ({str(value)[:40]}), not text"
            )
            raise UserError(f"{where}, row {i}: the {name!r} column {what}; {fix}")
    return [as_text(value) for value in values]


def class_name(names: Sequence[str], raw, where: str, column: str) -> str:
    """The name of `ClassLabel` index `raw`, or one line saying the index is out of range."""
    if isinstance(raw, int) and 0 <= raw < len(names):
        return names[raw]
    raise UserError(
        f"{where}: the {column!r} value {raw!r} is not a label index (0 to {len(names) - 1}: {', '.join(names)}); "
        "fix the row, or the ClassLabel names if a label is missing"
    )
