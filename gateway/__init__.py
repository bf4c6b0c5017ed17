"""The serving process: Kafka loop, sidecar servers, model repository, batching, ONNX execution."""
