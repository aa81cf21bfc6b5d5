#!/usr/bin/env bash
# Sets up star-mamba in ./.venv: the package and its dependencies (plus the test tools with
# --test) and, where apt is available, the built-in dataset (Debian's dataset-fashion-mnist).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [[ "${1:-}" == "--test" ]]; then extras="[test]"; fi

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [[ "$(id -u)" != 0 ]]; then sudo="sudo -n"; fi
  echo "setup: installing the built-in dataset (apt-get install dataset-fashion-mnist)"
  if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1; then
    echo "setup: warning: could not install dataset-fashion-mnist with apt; pretraining on it" \
         "will say how to get it (tests do not need it)"
  fi
fi

if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras}"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
