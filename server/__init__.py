"""PrefixServe: a multi-tenant LLM inference server for prefix-tuned tenants."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prefixserve")
except PackageNotFoundError:  # pragma: no cover - a checkout that was not installed
    __version__ = "0+unknown"
