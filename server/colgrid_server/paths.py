"""Where things live under a data dir. One place, so the CLI, builder and server agree."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def encoders(self) -> Path:
        return self.root / "encoders"

    @property
    def indexes(self) -> Path:
        return self.root / "indexes"

    @property
    def registry_file(self) -> Path:
        return self.root / "registry.db"

    def index_dir(self, index: str) -> Path:
        return self.indexes / index

    def version_dir(self, index: str, version: str) -> Path:
        return self.indexes / index / version
