"""colgrid client SDK (grpcio + protobuf only)."""
