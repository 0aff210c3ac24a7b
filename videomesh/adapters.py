"""Names of brand style adapters (LoRA), shared by the denoiser and the gateway.

`[a-z0-9_-]` words, optionally under one tenant folder: "spring-look" is public (any tenant may
use it), "acme/spring-look" belongs to tenant "acme" alone.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^(?:[a-z0-9][a-z0-9_-]{0,62}/)?[a-z0-9][a-z0-9_-]{0,62}$")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(
            f"adapter name {name!r} must be lower-case letters, digits, '_' or '-', optionally under "
            "one tenant folder ('acme/spring-look')"
        )
    return name


def owner(name: str) -> str:
    """The tenant an adapter belongs to; '' for a public one."""
    return name.split("/", 1)[0] if "/" in name else ""
