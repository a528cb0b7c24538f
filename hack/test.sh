#!/usr/bin/env bash
# Set up the host (hack/setup.sh) and run every test: unit and integration (real libvirtd
# guests under KVM or TCG, real network namespaces). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -ra "$@"
