#!/usr/bin/env bash
# Install kdlab (editable, with its test tools) into the active Python and make Fashion-MNIST
# available offline through Debian's dataset-fashion-mnist package when apt-get is at hand.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "kdlab setup: installing Debian's dataset-fashion-mnist (Fashion-MNIST idx files)"
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist; } >/dev/null; then
    echo "kdlab setup: apt-get failed; put the idx files in ./data or use data.download=true" >&2
  fi
fi

echo "kdlab setup: pip install -e .[dev,export,sweep,zoo,llm]"
python -m pip install -q -e ".[dev,export,sweep,zoo,llm]"
if command -v pyenv >/dev/null; then pyenv rehash; fi
echo "kdlab setup: done"
