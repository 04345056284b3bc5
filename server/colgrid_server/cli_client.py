"""How the client verbs of `colgrid` reach a server: address, deadline, API key and TLS, from
flags or COLGRID_* environment variables (so a runbook can export them once)."""
from __future__ import annotations

import argparse
import os

from colgrid_client import Client


def client_opts(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--target", default=env("COLGRID_TARGET", "localhost:50051"),
                   help="server address (default localhost:50051; env COLGRID_TARGET)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    p.add_argument("--api-key", default=env("COLGRID_API_KEY"),
                   help="API key sent as a bearer token (env COLGRID_API_KEY)")
    p.add_argument("--tls-ca", default=env("COLGRID_TLS_CA"),
                   help="connect with TLS, trusting this CA certificate (PEM; env COLGRID_TLS_CA)")
    p.add_argument("--tls-client-cert", default=env("COLGRID_TLS_CLIENT_CERT"),
                   help="mutual TLS: this client's certificate (PEM; env COLGRID_TLS_CLIENT_CERT)")
    p.add_argument("--tls-client-key", default=env("COLGRID_TLS_CLIENT_KEY"),
                   help="mutual TLS: this client's private key (PEM; env COLGRID_TLS_CLIENT_KEY)")


def connect(args: argparse.Namespace) -> Client:
    """A Client for the verb's flags (plaintext unless a CA or client certificate is given)."""
    return Client(args.target, timeout=args.timeout, api_key=args.api_key or None,
                  root_certificates=args.tls_ca or None, private_key=args.tls_client_key or None,
                  certificate_chain=args.tls_client_cert or None)
