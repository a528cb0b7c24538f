#!/usr/bin/env bash
# Set up the host (hack/setup.sh) and run every test: unit and integration (real libvirtd
# guests under KVM or TCG, real network namespaces) and CRI (a private containerd 2.x driving
# `vmsandbox serve` as Kubernetes does). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
# containerd 2.x and the CNI plugins for the CRI tests (tests/cri), unpacked into .cache/.
bash hack/fetch-containerd.sh >/dev/null
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -ra "$@"
