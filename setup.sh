#!/usr/bin/env bash
# Creates .venv with the pinned requirements (CPU build of jax), builds the oneDNN convolution
# library (models/native/build.sh; needs g++) and, where apt-get can be used, installs the Debian
# packages the tests use: dataset-fashion-mnist (the original Fashion-MNIST files, for the offline
# quickstart) and a Slurm (slurmctld, slurmd, slurm-client, munge) that tests/test_slurm.py starts
# as a single-node cluster in a temporary directory (tools/single_node_slurm.py). Set SKIP_APT=1
# to leave the system alone.
set -euo pipefail
cd "$(dirname "$0")"

packages=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
for program in slurmctld slurmd sbatch munged; do
  if ! command -v "$program" >/dev/null && ! [ -x "/usr/sbin/$program" ]; then
    packages+=(slurmctld slurmd slurm-client munge)
    break
  fi
done
if [ ${#packages[@]} -gt 0 ] && [ -z "${SKIP_APT:-}" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null) \
      || echo "setup.sh: could not install ${packages[*]}: TFDS will download Fashion-MNIST, and the Slurm tests skip." >&2
  else
    echo "setup.sh: not root or no apt-get: skipping ${packages[*]} (sudo apt-get install ${packages[*]})." >&2
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
.venv/bin/python -m pip install --quiet --no-deps -r requirements-peers.txt
# oneDNN's CPU convolutions as an XLA FFI library (models/onednn.py), built with g++.
bash models/native/build.sh .venv/bin/python
