#!/usr/bin/env bash
# Fetches, on a machine that reaches PyPI, everything the GPU install needs into DIR (default wheels/, ignored by
# git), for a GPU node that reaches no registry: every wheel of `envs/requirements.py gpu [test]` and their
# dependencies for Linux x86-64 and CPython X.Y (default: this python3's), setuptools for building the package,
# and Debian's dataset-fashion-mnist package (the demo's data) when apt-get is there. Then, on the node:
#   bash envs/install.sh --gpu --wheels DIR
# usage: bash envs/fetch-wheels.sh [DIR] [--python X.Y] [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="wheels" python="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" test=""
while [ $# -gt 0 ]; do
    case "$1" in
        --python) python="$2"; shift ;;
        --test) test="test" ;;
        -*) echo "usage: bash envs/fetch-wheels.sh [DIR] [--python X.Y] [--test]" >&2; exit 2 ;;
        *) dir="$1" ;;
    esac
    shift
done
mkdir -p "$dir"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
python3 envs/requirements.py gpu $test > "$dir/requirements.txt"
echo "setuptools>=68" >> "$dir/requirements.txt"  # the package's build backend (pyproject.toml)
start=$SECONDS
python3 -m pip download -q --disable-pip-version-check --only-binary=:all: --implementation cp \
    --python-version "$python" "${platforms[@]}" -d "$dir" -r "$dir/requirements.txt" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
if command -v apt-get >/dev/null; then
    (cd "$dir" && apt-get download -qq dataset-fashion-mnist) || echo "note: dataset-fashion-mnist not fetched" >&2
fi
echo "fetched into $dir for CPython $python in $((SECONDS - start)) s: $(du -sh "$dir" | cut -f1)," \
     "$(ls "$dir" | grep -c '\.whl$') wheels"
