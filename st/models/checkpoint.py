"""Our own checkpoints: a folder with config.json and model.safetensors (encoder, pooler, task head).

config.json = {"format": "st", "encoder": BertConfig fields, "head": {"num_labels", "dropout"}, ...meta}
where meta is whatever made the checkpoint (task, training config, ticket) so every output folder
carries the config that made it.
"""

from __future__ import annotations

from pathlib import Path

from st.errors import UserError
from st.io import write_json, write_safetensors
from st.layout import CONFIG, WEIGHTS
from st.models.bert import BertConfig
from st.models.families import build_encoder, config_from_dict
from st.models.heads import BertClassifier
from st.models.weights import ST_FORMAT, read_config, read_tensors


def save_checkpoint(folder: str | Path, model: BertClassifier, **meta) -> None:
    folder = Path(folder)
    head = {"num_labels": model.num_labels, "dropout": model.classifier.dropout.p}
    # Weights first, config last: a folder whose config.json exists holds finished weights.
    write_safetensors(folder / WEIGHTS, model.state_dict())
    write_json(folder / CONFIG, {"format": ST_FORMAT, "encoder": model.encoder.config.to_dict(), "head": head, **meta})


def load_checkpoint(folder: str | Path, config: dict | None = None) -> tuple[BertClassifier, dict]:
    """(model, config.json contents) of a checkpoint written by `save_checkpoint`; `config`: its
    config.json, when the caller has read it already."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist; pass the --out folder of `st finetune`")
    encoder, num_labels, cfg = _read_checked(folder, config)
    model = BertClassifier(build_encoder(encoder), num_labels, cfg["head"]["dropout"])
    tensors, source = read_tensors(folder)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # a shape that disagrees with config.json (e.g. an edited num_labels)
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise UserError(f"{source} does not match its config.json: {first.strip()}") from None
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise UserError(
            f"{source}: {'missing' if missing else 'unknown'} key {key!r}; the checkpoint does not match its "
            "config.json"
        )
    return model, cfg


def read_checkpoint_config(folder: str | Path) -> tuple[BertConfig, int]:
    """(encoder config, number of labels) of a checkpoint, from its config.json alone."""
    config, num_labels, _ = _read_checked(Path(folder))
    return config, num_labels


def _read_checked(folder: Path, cfg: dict | None = None) -> tuple[BertConfig, int, dict]:
    cfg = read_config(folder) if cfg is None else cfg
    if cfg.get("format") != ST_FORMAT or "head" not in cfg:
        raise UserError(
            f'{folder} is not an st fine-tuned checkpoint (its config.json lacks "format": "st"); '
            "run `st finetune` first"
        )
    fix = "restore it from the run that made it"
    try:
        head = cfg["head"]
        labels, dropout = head["num_labels"], head["dropout"]
        encoder = config_from_dict(cfg["encoder"])
    except (KeyError, TypeError, AttributeError) as e:  # a hand-edited config.json
        raise UserError(
            f"{folder}/config.json has a broken encoder or head entry ({type(e).__name__}: {e}); {fix}"
        ) from None
    except UserError as e:
        raise UserError(f"{folder}/config.json: {e}") from None
    if type(labels) is not int or labels < 1:
        raise UserError(f"{folder}/config.json: head.num_labels must be a positive whole number, got {labels!r}; {fix}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"{folder}/config.json: head.dropout must be a number in [0, 1), got {dropout!r}; {fix}")
    return encoder, labels, cfg
