#!/usr/bin/env bash
# Fill .whl/ with the project's pinned Python packages that bench/gpu_all.sh needs on the GPU
# machine (Python 3.12, x86-64, no package registry there; it has torch, numpy, jinja2,
# safetensors, regex, pyyaml, requests, tqdm, pillow, protobuf, sentencepiece already).
# Run here, then carry .whl with the run (it is git-ignored; about 20 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl \
  transformers==4.48.3 tokenizers==0.21.4 huggingface_hub==0.36.2 \
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
ls -la .whl
