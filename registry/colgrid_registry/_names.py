"""Index and version names end up as directory names under <data>/indexes/: validate them once,
here, so no caller can reach outside that tree."""
from __future__ import annotations

import re

from colgrid_registry.errors import InvalidName

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_RULE = "use 1-63 characters from a-z 0-9 . _ -, starting with a letter or digit"


def check_name(name: object, *, kind: str) -> str:
    """Return `name` unchanged if it is a valid `kind` ("index" or "version") name."""
    if not isinstance(name, str):
        raise InvalidName(f"{kind} name must be a string, got {type(name).__name__}", field=kind)
    if NAME_PATTERN.fullmatch(name) and ".." not in name:
        return name
    raise InvalidName(f"invalid {kind} name {name!r}: {_reason(name)}; {_RULE}", field=kind)


def _reason(name: str) -> str:
    if not name:
        return "it is empty"
    if len(name) > 63:
        return f"it is {len(name)} characters long"
    if "/" in name or "\\" in name:
        return "path separators are not allowed"
    if ".." in name:
        return "'..' is not allowed"
    if name != name.lower():
        return "uppercase letters are not allowed"
    if not NAME_PATTERN.fullmatch(name[0]):
        return f"it starts with {name[0]!r}"
    bad = sorted({c for c in name if not NAME_PATTERN.fullmatch("a" + c)})
    return f"character(s) {''.join(bad)!r} are not allowed"
