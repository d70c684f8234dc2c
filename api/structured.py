"""Structured outputs on the HTTP API: OpenAI's ``response_format``, vLLM's ``structured_outputs`` and its older
``guided_*`` fields, each onto the ensembles' ``guided_decoding_guide_type`` / ``guided_decoding_guide``.

At most one of them per request (a 400 naming the second otherwise). A schema the grammar engine cannot
compile comes back from the engine as a 400 naming the field the client sent (``FIELDS``).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import ApiError
from .text import Text

Schema = dict | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    json_schema: Schema | None = Field(None, alias="schema")
    description: Text | None = None
    strict: bool | None = None  # the output always matches the schema here, strict or not


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs`` (0.12 and later); the fields vLLM uses only for its own backends are refused."""

    json_: Schema | Text | None = Field(None, alias="json")
    regex: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1)] | None = None
    grammar: Text | None = None
    json_object: bool | None = None


class Guided(BaseModel):
    """The request fields that ask for structured output (mixed into both endpoints' bodies)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Schema | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Annotated[list[Text], Field(min_length=1)] | None = None
    guided_grammar: Text | None = None


def _schema_text(schema, field: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as err:
            raise ApiError(400, f"'{field}' must be a JSON schema: {err}", field) from None
    if not isinstance(schema, (dict, bool)):
        raise ApiError(400, f"'{field}' must be a JSON schema (an object)", field)
    return json.dumps(schema)


def guide(body) -> tuple[str, str, str] | None:
    """(guide type, guide, the field it came from) for this request, or None when it asks for free text."""
    found = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("json_schema", json.dumps({"type": "object"}), "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise ApiError(400, "'response_format': type json_schema needs 'json_schema' (name, schema)",
                           "response_format")
        schema = rf.json_schema.json_schema
        found.append(("json_schema", _schema_text({} if schema is None else schema, "response_format"),
                      "response_format"))
    so = body.structured_outputs
    if so is not None:
        set_fields = [name for name in ("json_", "regex", "choice", "grammar", "json_object")
                      if getattr(so, name) not in (None, False)]
        if len(set_fields) != 1:
            raise ApiError(400, "'structured_outputs' takes exactly one of json, regex, choice, grammar, json_object",
                           "structured_outputs")
        found.append(_one(set_fields[0].rstrip("_"), getattr(so, set_fields[0]), "structured_outputs"))
    for name in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{name}")
        if value is not None:
            found.append(_one(name, value, f"guided_{name}"))
    if len(found) > 1:
        raise ApiError(400, f"'{found[1][2]}' and '{found[0][2]}' both constrain the output; send at most one",
                       found[1][2])
    return found[0] if found else None


def _one(kind: str, value, field: str) -> tuple[str, str, str]:
    if kind == "json":
        return "json_schema", _schema_text(value, field), field
    if kind == "json_object":
        return "json_schema", json.dumps({"type": "object"}), field
    if kind == "choice":
        return "choice", json.dumps(value), field
    return {"regex": "regex", "grammar": "ebnf_grammar"}[kind], value, field


def fields(source: str | None) -> dict:
    """Error field names for a request whose guide came from ``source``: the engine names its tensors."""
    if source is None:
        return {}
    return {"guided_decoding_guide": source, "guided_decoding_guide_type": source}
