#!/usr/bin/env bash
# Install, then run the whole test suite (unit tests, the real model, the CLI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q --timeout 900 -p no:cacheprovider "$@"
