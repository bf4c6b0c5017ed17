#!/usr/bin/env bash
# Regenerate the gRPC stubs from gateway/transport/proto/*.proto with grpcio-tools 1.71 (protobuf 5.29
# gencode runs on protobuf runtimes 5.29 to 7.x, so clients pinning protobuf 6, e.g. tritonclient, can share a venv).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=gateway/transport/proto
python -m grpc_tools.protoc -I $dir --python_out=$dir --grpc_python_out=$dir --pyi_out=$dir \
  $dir/grpc_predict_v2.proto $dir/banditgate_service.proto $dir/health.proto
# protoc writes top-level imports; make them package imports
sed -i 's/^import \(.*_pb2\) as/from gateway.transport.proto import \1 as/' $dir/*_pb2_grpc.py
# A private descriptor pool: the `inference` package then coexists in one process with other
# OIP stubs (tritonclient, kserve) that register the same names in the default pool.
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/_POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = _POOL.AddSerializedFile(/' $dir/*_pb2.py
# The client's own copy of the OIP modules (banditgate/client/proto): the client imports no gateway code.
client=banditgate/client/proto
cp $dir/grpc_predict_v2.proto $dir/grpc_predict_v2_pb2.py $dir/grpc_predict_v2_pb2.pyi $dir/grpc_predict_v2_pb2_grpc.py $client/
sed -i 's/^from gateway.transport.proto import/from banditgate.client.proto import/' $client/grpc_predict_v2_pb2_grpc.py
