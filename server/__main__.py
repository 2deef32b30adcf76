"""`python -m server` == `prefixserve`."""

from server.console import console

console()
