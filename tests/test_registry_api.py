"""The registry's public surface: what it exports and what importing it loads."""
from __future__ import annotations

import subprocess
import sys
import types

import colgrid_registry
from colgrid_registry import errors


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name, value in vars(colgrid_registry).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert sorted(colgrid_registry.__all__) == sorted(public)


def test_every_registry_error_is_exported_and_has_a_code() -> None:
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, errors.RegistryError)]
    assert {c.__name__ for c in classes} <= set(colgrid_registry.__all__)
    assert len({c.code for c in classes}) == len(classes)


def test_importing_the_registry_loads_no_grpc_torch_or_numpy() -> None:
    code = ("import sys, colgrid_registry, colgrid_registry.format; "
            "print(sorted(m for m in ('grpc', 'torch', 'numpy', 'google.protobuf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
