#!/usr/bin/env bash
# colgrid container entrypoint.
#
#   (no arguments)            colgrid serve, configured by COLGRID_* environment variables
#   --flag ...                colgrid serve --flag ...
#   healthcheck [SECONDS]     exit 0 when the local server's grpc.health.v1 reports SERVING
#   colgrid VERB ... | VERB   that colgrid command (index build, rollout status, demo, ...)
#   any other program         run it (bash, python, ...)
#
# Settings are read by colgrid itself (colgrid_server.config.Settings: field `x` is COLGRID_X),
# so nothing here re-parses them. Every branch execs: the server is the container's main
# process and receives SIGTERM directly, which drains in-flight requests for
# COLGRID_GRACE_SECONDS before exiting 0.
set -euo pipefail

healthcheck() {
    # Plaintext, like Kubernetes' native gRPC probes; with TLS on, probe from a sidecar or mesh.
    exec python - "127.0.0.1:${COLGRID_PORT:-50051}" "${1:-3}" <<'PY'
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target, timeout = sys.argv[1], float(sys.argv[2])
try:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                         timeout=timeout)
except grpc.RpcError as exc:
    print(f"healthcheck: {target}: {exc.code().name}", file=sys.stderr)
    sys.exit(1)
status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
print(f"healthcheck: {target}: {status}")
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
PY
}

if [ "$#" -eq 0 ]; then
    exec colgrid serve
fi
case "$1" in
    -*) exec colgrid serve "$@" ;;
    healthcheck) shift; healthcheck "$@" ;;
    colgrid) exec "$@" ;;
esac
if command -v -- "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec colgrid "$@"
