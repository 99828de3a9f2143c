"""Shared fixtures: a tiny random BERT checkpoint in Hugging Face layout and a tiny learnable task."""

from __future__ import annotations

import csv
import os
import random
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [
    "good",
    "great",
    "fine",
    "nice",
    "bad",
    "awful",
    "poor",
    "sad",
    "the",
    "movie",
    "was",
    "very",
    "plot",
    "acting",
]
POSITIVE, NEGATIVE = WORDS[:4], WORDS[4:8]


def write_tiny_bert(
    folder: Path, num_layers: int = 2, num_heads: int = 4, hidden: int = 16, ffn: int = 32, seed: int = 0
) -> Path:
    """A random BertModel saved by transformers itself: config.json, model.safetensors, vocab.txt."""
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ","]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=ffn,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def write_sentiment_csv(folder: Path, n_train: int = 192, n_dev: int = 48, seed: int = 0) -> Path:
    """Sentences whose label is whether they contain a positive or a negative word."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_dev)):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            for _ in range(n):
                label = rng.random() < 0.5
                filler = rng.sample(WORDS[8:], 3)
                words = filler + [rng.choice(POSITIVE if label else NEGATIVE)]
                rng.shuffle(words)
                writer.writerow([" ".join(words), "pos" if label else "neg"])
    return folder


def pytest_addoption(parser):
    parser.addoption(
        "--device", default="cpu", help="where tests/test_device.py runs: cpu (CI) or cuda (docs/gpu/check.sh)"
    )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of tests/test_device.py: `pytest --device cuda` runs its checks on a GPU."""
    name = request.config.getoption("--device")
    if torch.device(name).type == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory) -> Path:
    return write_sentiment_csv(tmp_path_factory.mktemp("sentiment"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: several intra-op threads only fight each other (and the other processes on a
    busy machine: runs take seconds instead of 0.2 s), so modules of many tiny runs use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for the rendezvous of processes a test spawns."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun_rank(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives rank `rank` of `world` processes on this machine (`st.dist.session` reads it)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


class Interrupt(Exception):
    """A stop in the middle of a run, raised from its on_epoch callback (`stop_at_epoch`)."""


def stop_at_epoch(epoch: int):
    """An on_epoch callback that stops the run once epoch `epoch` is evaluated (its progress is not
    saved yet: the run resumes after the epoch before)."""

    def on_epoch(done: int, metrics: dict) -> None:
        if done == epoch:
            raise Interrupt

    return on_epoch
