#!/usr/bin/env bash
# Installs what deepercluster needs on a Debian machine with Python 3.11:
# Fashion-MNIST from Debian (the demo's data), and a virtual environment .venv holding
# the package and its pinned dependencies. `--test` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
    else
        echo "note: Debian's dataset-fashion-mnist is not installed (sudo apt-get install dataset-fashion-mnist);" \
             "the demo will try torchvision's download instead" >&2
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras}" 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -c "import deepercluster, torch, faiss, snakemake" # fails loudly if the install did not work
echo "installed: $(.venv/bin/python -c 'import torch, faiss; print(f"torch {torch.__version__}, faiss {faiss.__version__}")')"
