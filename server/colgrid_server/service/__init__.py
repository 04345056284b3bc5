"""gRPC edge: the only layer that speaks protobuf and grpc."""
