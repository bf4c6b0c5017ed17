"""Generated gRPC/protobuf modules (scripts/gen_proto.sh); do not edit by hand. One copy, shared by
the gateway's servers (gateway/transport/grpc_server.py, grpc_health.py) and the client
(banditgate/client/grpc.py, which imports it only when a gRPC client is made, so
`import banditgate.client` needs neither grpcio nor protobuf). This package imports nothing."""
