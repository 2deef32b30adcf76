"""Logging set-up: JSON lines (default) or plain text, for the server's and uvicorn's loggers.

Request log lines are emitted by the HTTP layer with `extra={"fields": {...}}`; the JSON formatter merges those
fields into the line. Nothing here ever sees prompt text or API keys unless a caller puts them in a message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any


def logger_name(record: logging.LogRecord) -> str:
    """uvicorn logs its start-up and shutdown under "uvicorn.error" at level info: named "uvicorn" here, so that a
    search or an alert on "error" finds errors."""
    return "uvicorn" if record.name == "uvicorn.error" else record.name


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": int(record.created) + int(record.msecs) / 1000,  # (`time`'s instant, to the millisecond)
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": logger_name(record),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=True, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(logger)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.logger = logger_name(record)
        s = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and not getattr(record, "message_says_fields", False):
            s += " " + " ".join(f"{k}={_one_line(v)}" for k, v in fields.items() if v is not None)
        return s


def _one_line(v: Any) -> str:
    """A field's value on the line: text with line breaks or other control characters (a logged prompt) escaped
    as Python would write them, so no value can start a line that looks like another record."""
    text = str(v)
    if any(ch < " " or ch == "\x7f" for ch in text):
        return repr(text)
    return text


def setup_logging(level: str = "info", json_lines: bool = True, stream: Any = None) -> None:
    """Route the prefixserve, prefix_store and uvicorn loggers to one handler on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if json_lines else TextFormatter())
    lvl = getattr(logging, level.upper(), logging.INFO)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_prefixserve", False):
            root.removeHandler(h)
    handler._prefixserve = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(lvl)
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # one request line comes from the app instead
    if json_lines:
        # transformers' tqdm bars ("Loading weights: 100%|...") are raw text on stderr: not JSON lines
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        with contextlib.suppress(Exception):  # transformers missing or older: nothing to quiet
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
