"""Errors raised by the prefix store. Every one subclasses :class:`StoreError`.

Messages name the tenant, prefix and version involved; they never contain tensor data.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every prefix-store error."""


class InvalidName(StoreError, ValueError):
    """A tenant id or prefix name does not match ``[A-Za-z0-9._-]{1,128}`` (or is ``.``/``..``)."""


class PrefixNotFound(StoreError, LookupError):
    """No such prefix (or no such version of it)."""


class FingerprintMismatch(StoreError):
    """The prefix was trained on another base model than the one the caller serves."""


class ChecksumMismatch(StoreError):
    """The stored tensor bytes do not match the sha256 recorded in the metadata (corruption)."""


class InvalidPrefix(StoreError, ValueError):
    """Bad record: unknown kind, missing/ill-shaped ``kv``, non-finite values, unparsable or truncated
    safetensors bytes, or tensors that disagree with their metadata."""


class PrefixValuesOutOfRange(InvalidPrefix):
    """A well-formed record whose values are NaN, infinite or larger than a prefix may hold (a training that ran
    away, not a corrupt record)."""


class StoreUnavailable(StoreError):
    """The backend (Redis server, filesystem) cannot be reached or cannot be written."""


class StoreReadOnly(StoreUnavailable):
    """A change to a store that can only be read (a file store whose filesystem is mounted read-only): it serves
    its prefixes, and takes no change until it is mounted read-write."""


class StoreRefused(StoreError):
    """The backend refused an operation for a reason of its own (a Redis error reply such as WRONGTYPE or NOPERM,
    a store already closed): the deployment's fault, neither the caller's nor a record's, and not transient."""


__all__ = [
    "ChecksumMismatch",
    "FingerprintMismatch",
    "InvalidName",
    "InvalidPrefix",
    "PrefixNotFound",
    "StoreError",
    "StoreReadOnly",
    "StoreRefused",
    "StoreUnavailable",
]


class VersionTaken(StoreError):
    """A put asked for a version number the name has had already (copying a store keeps version numbers)."""
