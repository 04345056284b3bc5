"""Serving state: which loaded index versions answer which requests (DESIGN.md "Registry and
rollouts").

    ServingState      immutable snapshot {index -> IndexRoutes}, refreshed from the registry
    IndexRoutes       one rollout implemented: stable, canary (sticky buckets), shadow (sampled)
    ServedVersion     a loaded, checked, warmed version with its encoder; leased per request
    ShadowRunner      background shadow searches, bounded; overlap/rank stats per version pair
    RolloutChanges    rollout changes made through this server: check, compare-and-set, apply
    Replica           heartbeats {index: generation served}; who acknowledged a generation

Domain only: nothing here imports grpc or protobuf.
"""
from colgrid_server.serving._changes import Change, RolloutChanges
from colgrid_server.serving._replica import Acknowledgements, Replica, default_replica_id
from colgrid_server.serving._routing import BUCKETS, IndexRoutes, bucket_of
from colgrid_server.serving._shadow import (
    ShadowRunner, ShadowStats, overlap_at_k, rank_biased_overlap)
from colgrid_server.serving._state import LoadFailure, Route, ServingState, VersionUse
from colgrid_server.serving._versions import (
    CHECKS, Answer, Lease, Query, ServedVersion, VersionCheckFailed, load_version)

__all__ = [
    "BUCKETS",
    "CHECKS",
    "Acknowledgements",
    "Answer",
    "Change",
    "IndexRoutes",
    "Lease",
    "LoadFailure",
    "Query",
    "Replica",
    "RolloutChanges",
    "Route",
    "ServedVersion",
    "ServingState",
    "ShadowRunner",
    "ShadowStats",
    "VersionCheckFailed",
    "VersionUse",
    "bucket_of",
    "default_replica_id",
    "load_version",
    "overlap_at_k",
    "rank_biased_overlap",
]
