"""latentwatch's monitor side: probes, the analysis core, the sidecar, ops artifacts and the demo."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    """The installed distribution's version ("unknown" when the code runs from a checkout that is not installed)."""
    try:
        return metadata.version("latentwatch")
    except metadata.PackageNotFoundError:
        return "unknown"
