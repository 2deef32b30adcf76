"""Structured-output fields of request bodies → the engine's `StructuredOutputs`.

`structured_outputs` (vLLM's object, on every generation route) and OpenAI's `response_format` (on the /v1 routes)
name what the output must match; `engine_spec` turns either into one engine spec and the body field that errors
should name. The spec is compiled (and so checked) by `Service.structured` before anything is queued.
"""

from __future__ import annotations

import json

from server.api.errors import APIError
from server.api.schemas import ResponseFormat, StructuredOutputsParam
from server.engine import StructuredOutputs
from server.engine.types import STRUCTURED_KINDS


def _given(so: StructuredOutputsParam) -> dict[str, str]:
    """The fields set, by their JSON name (= the engine's kind), with the engine's spec text."""
    values = {
        "json": so.json_schema if isinstance(so.json_schema, str | None) else json.dumps(so.json_schema),
        "json_object": "" if so.json_object else None,
        "regex": so.regex,
        "choice": None if so.choice is None else json.dumps(so.choice),
        "grammar": so.grammar,
        "structural_tag": (
            so.structural_tag if isinstance(so.structural_tag, str | None) else json.dumps(so.structural_tag)
        ),
    }
    return {k: v for k, v in values.items() if v is not None}


def engine_spec(
    so: StructuredOutputsParam | None,
    rf: ResponseFormat | None = None,
    compact: bool = False,
    guided: bool = False,
) -> tuple[StructuredOutputs | None, str]:
    """(spec or None, the body field that errors about it name). `compact`: a response_format's JSON without
    whitespace between tokens (vLLM's `guided_whitespace_pattern: ""`). `guided`: `so` was made from the older
    guided_json / guided_regex / guided_choice / guided_grammar fields, which errors then name."""
    if rf is not None and rf.type != "text":
        if so is not None:
            raise APIError(
                422, "give response_format or structured_outputs, not both", param="structured_outputs"
            )
        if rf.type == "json_object":
            return StructuredOutputs("json_object", any_whitespace=not compact), "response_format"
        if rf.type == "structural_tag":
            if rf.structures is None or rf.triggers is None:
                raise APIError(
                    422,
                    "response_format of type structural_tag needs structures and triggers",
                    param="response_format",
                )
            tags = {
                "structures": [s.model_dump(by_alias=True) for s in rf.structures],
                "triggers": rf.triggers,
            }
            return StructuredOutputs(
                "structural_tag", json.dumps(tags), any_whitespace=not compact
            ), "response_format"
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(
                422, "response_format of type json_schema needs json_schema.schema", param="response_format"
            )
        return StructuredOutputs(
            "json", json.dumps(rf.json_schema.schema_), any_whitespace=not compact
        ), "response_format.json_schema.schema"
    if so is None:
        return None, ""
    given = _given(so)
    if len(given) != 1 and guided:
        raise APIError(
            422,
            f"give one of the guided_* fields (got {', '.join('guided_' + k for k in given)})",
            param="guided_json",
        )
    if len(given) != 1:
        got = f" (got {', '.join(given)})" if given else ""
        raise APIError(
            422,
            f"structured_outputs needs exactly one of {', '.join(STRUCTURED_KINDS)}{got}",
            param="structured_outputs",
        )
    ((kind, text),) = given.items()
    spec = StructuredOutputs(kind, text, any_whitespace=not so.disable_any_whitespace)  # type: ignore[arg-type]
    return spec, f"guided_{kind}" if guided else f"structured_outputs.{kind}"
