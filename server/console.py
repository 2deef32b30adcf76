"""The `prefixserve` command's entry point, kept light: its first second or two import torch and the server
(`server.cli`), and Ctrl-C then ended the command with a 40-frame KeyboardInterrupt traceback from inside an import.
Here it ends as Ctrl-C does at any other moment before a command handles it: quietly, exit 130 (128 + SIGINT)."""

from __future__ import annotations

import os
import sys
import typing

EXIT_INTERRUPTED = 130


def console() -> typing.NoReturn:
    try:
        from server import cli
    except KeyboardInterrupt:
        _interrupted()
    try:
        rc = cli.main()
    except KeyboardInterrupt:  # (`serve` handles its own signals; `train` says what it leaves behind)
        _interrupted()
    cli.end_process(rc)


def _interrupted() -> typing.NoReturn:
    with_newline = "\n" if sys.stderr.isatty() else ""  # (after the terminal's ^C)
    sys.stderr.write(f"{with_newline}prefixserve: interrupted\n")
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)
