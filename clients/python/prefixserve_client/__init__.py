"""PrefixServe Python SDK."""
