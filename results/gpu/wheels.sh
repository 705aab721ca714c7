#!/usr/bin/env bash
# Downloads the packages the GPU machine lacks (tyro, clean-fid, diffusers, mlxtend and what they need
# that is not there) as wheels for its Python 3.12 into .wheels/ (git-ignored), at the versions installed
# here. On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/../.."
ver() { python3 -m pip show "$1" 2>/dev/null | awk '/^Version/{print $2}'; }
pkgs=()
for p in tyro docstring-parser typeguard clean-fid diffusers importlib_metadata mlxtend; do
  v=$(ver "$p"); pkgs+=("$p${v:+==$v}")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .wheels "${pkgs[@]}"
ls -la .wheels
