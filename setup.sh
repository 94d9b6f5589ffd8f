#!/usr/bin/env bash
# Creates .venv with the pinned requirements (CPU build of jax), builds the oneDNN convolution
# library (models/native/build.sh; needs g++) and, where apt-get can be used,
# installs Debian's dataset-fashion-mnist (the original Fashion-MNIST files, for the offline
# quickstart). Set SKIP_APT=1 to leave the system packages alone.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${SKIP_APT:-}" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
      || echo "setup.sh: could not install dataset-fashion-mnist; TFDS will download Fashion-MNIST instead." >&2
  else
    echo "setup.sh: not root or no apt-get: skipping dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)." >&2
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
.venv/bin/python -m pip install --quiet --no-deps -r requirements-peers.txt
# oneDNN's CPU convolutions as an XLA FFI library (models/onednn.py), built with g++.
bash models/native/build.sh .venv/bin/python
