"""`python -m server` == `prefixserve`."""

from server.cli import console

console()
