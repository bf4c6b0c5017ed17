"""The client's copy of the generated OIP gRPC modules (scripts/gen_proto.sh writes both copies; a
test checks they describe the same protocol): the client imports no gateway code. Imported only by
banditgate.client.grpc, so `import banditgate.client` needs neither grpcio nor protobuf."""
