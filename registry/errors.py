"""Errors of the registry: every one names the bad thing and what to do."""

from __future__ import annotations

from xmerge.errors import XmergeError


class RegistryError(XmergeError):
    """A registry operation the user asked for cannot be done (unknown ref, conflict, bad bundle...)."""


class CorruptBlobError(RegistryError):
    """A stored blob is missing or its content no longer matches its sha256."""
