"""Atomic file writes: a finished result is never replaced by a partial one, nor by accident.

Every writer goes to a temporary file in the same folder, flushes it to disk and renames it over
the target; a crash or a full disk leaves the old file (or none) and no truncated one or temporary.
Commands check their output paths first (`check_output`): an existing file is never replaced
unless the user says --overwrite, and then only a previous output of the same kind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from st.errors import UserError

if TYPE_CHECKING:
    import torch


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; results are meant to be shared
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def strict_json(text: str):
    """JSON as the standard has it: NaN and Infinity (which Python's json reads and writes) are refused
    with a ValueError naming them. For inputs where such a value is always a mistake."""

    def refuse(name: str):
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(text, parse_constant=refuse)


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file  # imported here: readers of JSON (`st report`) never load torch

    # safetensors refuses shared or non-contiguous storage: store plain contiguous copies.
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as e:  # its own SafetensorError wraps the OS error (a full disk): pass that on
            if "os error" not in str(e):
                raise
            code = int(str(e).rsplit("os error", 1)[1].strip(" )"))
            raise OSError(code, os.strerror(code), str(path)) from None
        os.chmod(tmp, 0o644)  # save_file writes a new owner-only file: results are meant to be shared


def write_torch(path: str | Path, obj) -> None:
    """Training state (tensors, numbers, lists, dicts only), read back with torch.load(weights_only=True)."""
    import torch  # imported here: readers of JSON (`st report`) never load torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@functools.lru_cache(maxsize=64)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # in 1 MiB pieces: hashlib.file_digest would need Python 3.11
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """The sha256 of a file, computed once per process for an unchanged file (a sweep asks 75 times)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _digest(path, stat.st_size, stat.st_mtime_ns)


def copy_file(source: str | Path, target: str | Path) -> None:
    """Copy atomically: a full disk leaves the old target (or none), never a truncated one."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


# ---- output paths ----------------------------------------------------------------------------------


def is_json_with(*keys: str) -> Callable[[Path], bool]:
    """A recogniser of our JSON outputs by their keys (scores have "head_raw", tickets "head_mask")."""

    def recognise(path: Path) -> bool:
        try:
            data = read_json(path)
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)

    return recognise


def is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def starts_with(header: str) -> Callable[[Path], bool]:
    """A recogniser of text outputs by their first line (predictions start "index<TAB>prediction")."""

    def recognise(path: Path) -> bool:
        with open(path, "rb") as f:
            return f.readline().decode("utf-8", "replace").rstrip("\r\n") == header

    return recognise


def check_output(
    path: str | Path, what: str, suffixes: tuple[str, ...], same_kind: Callable[[Path], bool], overwrite: bool = False
) -> Path:
    """Refuse an output path before any work is done: a suffix that does not fit what is written, a
    folder, an existing file (unless `overwrite` and it is a previous output of the same kind), or a
    folder that cannot be written to. Returns the path."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UserError(
            f"{path} does not end in {' or '.join(suffixes)}, but it would hold {what}; name it e.g. "
            f"{path.with_suffix(suffixes[0]).name}"
        )
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file path for {what}")
    if path.exists():
        if not overwrite:
            raise UserError(f"{path} already exists; choose another path, or pass --overwrite to replace it")
        if not same_kind(path):
            raise UserError(
                f"{path} exists and is not {what}; --overwrite only replaces a previous output of the same kind"
            )
    check_writable(path.parent)
    return path


def check_writable(folder: str | Path) -> None:
    """Fail in one line, before any compute, when `folder` cannot be created or written to."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(
            f"cannot write to {folder} ({e.strerror}); choose another output folder or fix its permissions"
        ) from None


@contextmanager
def staged_outputs(targets: list[Path]):
    """Write several outputs all or nothing (a command with more than one output: `st export`,
    `st score`'s scores and heatmap). Yields one staging path per target, a hidden sibling (same
    folder, same suffix) to write the file or folder into; when the block ends well, every staging
    path is renamed onto its target with SIGINT and SIGTERM held back, so an interrupt or a full disk
    leaves all outputs or none, and the corrected command is never refused for a half-written one.
    A target that exists as an empty folder is replaced."""
    targets = [Path(path).resolve() for path in targets]  # a symlinked folder: write into what it names
    staged = [path.with_name(f".{path.stem}.staging-{os.getpid()}{path.suffix}") for path in targets]
    for path in staged:
        _remove(path)  # a stale one from a killed earlier attempt of this pid
    try:
        yield staged
    except BaseException:
        for path in staged:
            _remove(path)
        raise
    with _signals_held():
        for path, target in zip(staged, targets):
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            os.replace(path, target)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done (main thread, POSIX), then arrive."""
    import signal
    import threading

    hold = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if hold:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        if hold:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
