"""colgrid server: encoders, index versions, search and the gRPC service."""
