#!/usr/bin/env bash
# Regenerate the Python protobuf/gRPC modules (and .pyi stubs) under vmsandbox/proto/ from the
# .proto files beside them. The proto root is the repo root, so every generated import reads
# `from vmsandbox.proto... import ..._pb2` and no top-level `types` package appears; the wire
# package names (containerd.types, ...) are unaffected. Run from the repo root.
#
# The generated code pins its runtime: protobuf >= the "Protobuf Python Version" in each
# *_pb2.py header and grpcio >= GRPC_GENERATED_VERSION in *_pb2_grpc.py (the grpcio-tools used).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
mapfile -t protos < <(find vmsandbox/proto -name '*.proto' | LC_ALL=C sort)
[ "${#protos[@]}" -gt 0 ] || { echo "gen-proto: no .proto files under vmsandbox/proto" >&2; exit 1; }
# A service served over ttrpc (vmsandbox.ttrpc; it says so in a comment) gets no gRPC stub.
mapfile -t services < <(grep -l '^service ' "${protos[@]}" | xargs grep -L '^// Served over ttrpc')

find vmsandbox/proto \( -name '*_pb2.py' -o -name '*_pb2.pyi' -o -name '*_pb2_grpc.py' \) -delete
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. "${protos[@]}"
# gRPC stubs only for files that declare a gRPC service (the others would be empty modules).
"$PY" -m grpc_tools.protoc -I . --grpc_python_out=. "${services[@]}"

# Every directory on the way to a generated module must be a regular package so that
# setuptools' packages.find ships it.
while IFS= read -r dir; do
  [ -e "$dir/__init__.py" ] || : > "$dir/__init__.py"
done < <(find vmsandbox/proto -type d)

echo "gen-proto: ${#protos[@]} protos -> $(find vmsandbox/proto -name '*_pb2*.py*' | wc -l) generated files"
