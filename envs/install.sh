#!/usr/bin/env bash
# Installs what deepercluster needs on a Debian machine with Python 3.11:
# Fashion-MNIST from Debian (the demo's data), a virtual environment .venv holding the
# package and its pinned dependencies, and the profiles in profiles/ linked where Snakemake
# looks for a profile name, so `snakemake --profile slurm` works from this folder.
# `--test` adds the test tools; `--profiles` only links the profiles (e.g. after moving the checkout).
# `--gpu` (GPU nodes) installs Meta's faiss-gpu wheel (the extra gpu) instead of faiss-cpu (cpu), the same
# module; `--wheels DIR` installs from DIR alone, reaching no registry (DIR made by envs/fetch-wheels.sh, which
# also holds Debian's dataset-fashion-mnist package, installed from there when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

# Snakemake looks for `--profile NAME` in ./NAME, then in its user and site config folders
# (platformdirs: ${XDG_CONFIG_HOME:-~/.config}/snakemake on Linux), never in profiles/.
# Each profiles/NAME is linked there as NAME; an existing NAME that is not that link is left alone.
link_profiles() {
    local folder name link target
    folder="$(.venv/bin/python -c 'from snakemake.common import get_appdirs; print(get_appdirs().user_config_dir)')"
    mkdir -p "$folder"
    for target in "$(pwd -P)"/profiles/*/; do
        target="${target%/}"
        name="$(basename "$target")"
        link="$folder/$name"
        if [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then
            continue
        elif [ -L "$link" ] && [ ! -e "$link" ]; then  # a link into a checkout that was moved or deleted
            echo "profile $name: $link -> $target (it linked to $(readlink "$link"), which no longer exists)"
            ln -sfn "$target" "$link"
        elif [ -e "$link" ] || [ -L "$link" ]; then
            echo "warning: $link already exists and is not a link to $target: left as it is," \
                 "so 'snakemake --profile $name' uses it; to use this repository's, remove it and run" \
                 "'bash envs/install.sh --profiles', or run 'snakemake --profile profiles/$name'" >&2
        else
            ln -s "$target" "$link"
            echo "profile $name: $link -> $target"
        fi
    done
}

test="" gpu="" wheels=""  # --test, --gpu: set to 1
while [ $# -gt 0 ]; do
    case "$1" in
        --profiles) link_profiles; exit 0 ;;
        --test) test=1 ;;
        --gpu) gpu=1 ;;
        --wheels) wheels="$(cd "$2" && pwd)"; shift ;;
        *) echo "usage: bash envs/install.sh [--test] [--gpu] [--wheels DIR] | --profiles" >&2; exit 2 ;;
    esac
    shift
done
pip_options=(-q --disable-pip-version-check)
[ -n "$wheels" ] && pip_options+=(--no-index --find-links "$wheels")

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    deb="$(ls "${wheels:-/nonexistent}"/dataset-fashion-mnist_*.deb 2>/dev/null | head -1 || true)"
    if [ "$(id -u)" = 0 ] && [ -n "$deb" ]; then
        dpkg -i "$deb" >/dev/null
    elif [ "$(id -u)" = 0 ] && [ -z "$wheels" ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
    else
        echo "note: Debian's dataset-fashion-mnist is not installed (sudo apt-get install dataset-fashion-mnist);" \
             "the demo will try torchvision's download instead" >&2
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
if [ -n "$gpu" ]; then faiss=gpu other=cpu; else faiss=cpu other=gpu; fi
.venv/bin/pip uninstall -q -y "faiss-$other" 2>/dev/null || true  # one build of the faiss module, never both
.venv/bin/pip install "${pip_options[@]}" -e ".[${faiss}${test:+,test}]" 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -c "import deepercluster, torch, faiss, snakemake" # fails loudly if the install did not work
link_profiles
echo "installed: $(.venv/bin/python -c 'import torch, faiss
print(f"torch {torch.__version__} ({torch.cuda.device_count()} GPUs), faiss {faiss.__version__} ({faiss.get_num_gpus()} GPUs)")')"
