"""The upstream releases this package supports, and the check that refuses any other.

This table is the one place the range is written down: ``pyproject.toml``'s bounds and
``.ci/lower-bounds.txt`` are pinned to it by ``tests/peft_ext/test_versions.py``. Both packages
check before importing anything that depends on these libraries, so an unsupported release fails
with one message that names the installed version, the supported range and the pip command that
fixes it, instead of a stack trace from inside TRL or PEFT, or (worse) a silently skipped hook.

This module imports only the standard library and ``packaging``: ``trl_ext`` imports it too, and
``peft_ext`` must never import ``trl``.

Example:

    >>> from peft_ext._versions import requirement
    >>> requirement("trl")
    'trl>=1.16.0,<1.17'
"""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# distribution -> (lowest supported release, first unsupported release). Lowest releases are the ones
# the lower-bounds CI job installs; the upper bound is the next minor, which nobody has tested yet.
SUPPORTED: dict[str, tuple[str, str]] = {
    "trl": ("1.16.0", "1.17"),
    "transformers": ("5.23.0", "5.26"),
    "peft": ("0.21.0", "0.22"),
    "accelerate": ("1.12.0", "1.17"),
}

DISTRIBUTION = "peft-trl-ext"


class UnsupportedVersionError(ImportError):
    """An installed upstream release lies outside :data:`SUPPORTED`."""


def requirement(name: str) -> str:
    """The pip requirement for ``name``'s supported range, e.g. ``"trl>=1.16.0,<1.17"``."""
    low, high = SUPPORTED[name]
    return f"{name}>={low},<{high}"


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or ``None`` when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def is_supported(name: str, version: str) -> bool:
    """Whether ``version`` of ``name`` lies in the supported range.

    Pre-releases inside the range count (``1.16.1.dev0``); pre-releases of the upper bound do not
    (``1.17.0.dev0`` is outside ``<1.17``), nor do those of the lower bound (``1.16.0rc1 < 1.16.0``).
    """
    try:
        Version(version)
    except InvalidVersion:
        return False
    low, high = SUPPORTED[name]
    return SpecifierSet(f">={low},<{high}").contains(version, prereleases=True)


def unsupported(names) -> list[tuple[str, str | None]]:
    """``(name, installed version or None)`` for each of ``names`` that is missing or outside its range."""
    found = [(name, installed_version(name)) for name in names]
    return [(name, version) for name, version in found if version is None or not is_supported(name, version)]


def require_supported_versions(names, package: str) -> None:
    """Raise :class:`UnsupportedVersionError` unless every distribution in ``names`` is in its supported range.

    ``package`` is the importing package (``"peft_ext"`` or ``"trl_ext"``), named in the message.
    All offending distributions are reported in one error with one pip command.
    """
    bad = unsupported(names)
    if not bad:
        return
    header = f"{package} ({DISTRIBUTION}) does not support the installed {', '.join(name for name, _ in bad)}:"
    lines = [f"  {name} {version or '(not installed)'}: supported is {requirement(name)}" for name, version in bad]
    fix = "Install a supported release: pip install " + " ".join(f'"{requirement(name)}"' for name, _ in bad)
    raise UnsupportedVersionError("\n".join([header, *lines, fix]))
