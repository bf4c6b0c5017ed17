#!/usr/bin/env bash
# Regenerate the gRPC stubs from banditgate/proto/*.proto with grpcio-tools 1.71 (protobuf 5.29
# gencode runs on protobuf runtimes 5.29 to 7.x, so clients pinning protobuf 6, e.g. tritonclient, can share a venv).
# One copy, in banditgate/proto: the gateway and the client both import it (the client imports no gateway code).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=banditgate/proto
python -m grpc_tools.protoc -I $dir --python_out=$dir --grpc_python_out=$dir --pyi_out=$dir \
  $dir/grpc_predict_v2.proto $dir/banditgate_service.proto $dir/health.proto
# protoc writes top-level imports; make them package imports
sed -i 's/^import \(.*_pb2\) as/from banditgate.proto import \1 as/' $dir/*_pb2_grpc.py
# A private descriptor pool: the `inference` package then coexists in one process with other
# OIP stubs (tritonclient, kserve) that register the same names in the default pool.
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/_POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = _POOL.AddSerializedFile(/' $dir/*_pb2.py
