"""JSON schemas that structured outputs must hold to: objects, nested arrays, enums, anyOf, $ref / $defs, string
patterns and formats, numeric bounds, closed objects. Strings are bounded so that a small model finishes them
within a test's token budget; what is generated must ``json.loads`` and validate with ``jsonschema``."""

from __future__ import annotations

WORD = {"type": "string", "maxLength": 8}
SHORT_INT = {"type": "integer", "minimum": -999, "maximum": 999}


def closed(properties: dict, required: list[str] | None = None) -> dict:
    """An object with exactly these properties (all required unless ``required`` says otherwise)."""
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": list(properties) if required is None else required}


SCHEMAS: dict[str, dict] = {
    "integer": {"type": "integer"},
    "bounded_integer": {"type": "integer", "minimum": 3, "maximum": 17},
    "exclusive_bounds": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "number": {"type": "number", "minimum": -5.5, "maximum": 5.5},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "const": {"const": "fixed"},
    "enum_strings": {"enum": ["red", "green", "blue"]},
    "enum_mixed": {"enum": [1, "two", None, True]},
    "bounded_string": {"type": "string", "minLength": 2, "maxLength": 5},
    "pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "pattern_unanchored": {"type": "string", "pattern": "[a-c]+x", "maxLength": 10},
    "format_date": {"type": "string", "format": "date"},
    "format_time": {"type": "string", "format": "time"},
    "format_date_time": {"type": "string", "format": "date-time"},
    "format_email": {"type": "string", "format": "email", "maxLength": 30},
    "format_uuid": {"type": "string", "format": "uuid"},
    "format_ipv4": {"type": "string", "format": "ipv4"},
    "one_property": closed({"name": WORD}),
    "two_types": closed({"name": WORD, "age": {"type": "integer", "minimum": 0, "maximum": 150}}),
    "ten_properties": closed({f"p{i}": SHORT_INT for i in range(10)}),
    "optional_properties": closed({"a": SHORT_INT, "b": WORD, "c": {"type": "boolean"}}, required=["a"]),
    "nullable": closed({"value": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}}),
    "nested_object": closed({"outer": closed({"inner": closed({"leaf": {"type": "boolean"}})})}),
    "array_of_integers": {"type": "array", "items": SHORT_INT, "maxItems": 4},
    "array_bounds": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    "array_of_objects": {"type": "array", "items": closed({"id": SHORT_INT, "tag": WORD}), "minItems": 1,
                         "maxItems": 2},
    "nested_arrays": {"type": "array", "items": {"type": "array", "items": SHORT_INT, "maxItems": 3}, "maxItems": 3},
    "matrix": closed({"rows": {"type": "array", "maxItems": 2,
                               "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                         "items": {"type": "number", "minimum": 0, "maximum": 1}}}}),
    "tuple": {"type": "array", "prefixItems": [SHORT_INT, WORD, {"type": "boolean"}], "items": False},
    "enum_in_object": closed({"color": {"enum": ["red", "green"]}, "size": {"enum": ["S", "M", "L"]}}),
    "any_of": {"anyOf": [SHORT_INT, WORD]},
    "any_of_objects": {"anyOf": [closed({"kind": {"const": "circle"}, "r": SHORT_INT}),
                                 closed({"kind": {"const": "square"}, "side": SHORT_INT})]},
    "one_of_consts": {"oneOf": [{"const": "yes"}, {"const": "no"}]},
    "ref_defs": {"$defs": {"point": closed({"x": SHORT_INT, "y": SHORT_INT})},
                 **closed({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}})},
    "ref_definitions": {"definitions": {"name": WORD}, **closed({"first": {"$ref": "#/definitions/name"}})},
    "recursive_ref": {"$defs": {"node": closed({"v": SHORT_INT, "next": {"anyOf": [{"$ref": "#/$defs/node"},
                                                                                    {"type": "null"}]}})},
                      "$ref": "#/$defs/node"},
    "all_of": {"allOf": [closed({"a": SHORT_INT, "b": SHORT_INT}), {"required": ["a", "b"]}]},
    "pattern_properties_closed": closed({"code": {"type": "string", "pattern": "^[0-9a-f]{4}$"}}),
    "string_enum_array": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 5},
    "unique_keys": closed({"id": {"type": "string", "format": "uuid"}, "when": {"type": "string", "format": "date"}}),
    "integer_bounds_negative": {"type": "integer", "minimum": -20, "maximum": -10},
    "number_in_object": closed({"price": {"type": "number", "minimum": 0, "maximum": 1000},
                                "currency": {"enum": ["EUR", "USD"]}}),
    "person": closed({"name": WORD, "email": {"type": "string", "format": "email", "maxLength": 24},
                      "tags": {"type": "array", "items": WORD, "maxItems": 3}}),
    "event": {"$defs": {"when": {"type": "string", "format": "date-time"}},
              **closed({"title": WORD, "start": {"$ref": "#/$defs/when"}, "attendees": {
                  "type": "array", "items": closed({"name": WORD}), "maxItems": 2}})},
    "open_object": {"type": "object", "properties": {"k": SHORT_INT}, "required": ["k"], "maxProperties": 1},
    "empty_object": closed({}),
    "boolean_or_object": {"anyOf": [{"type": "boolean"}, closed({"ok": {"type": "boolean"}})]},
    "deep_nesting": closed({"a": closed({"b": closed({"c": closed({"d": {"type": "array", "items": SHORT_INT,
                                                                         "maxItems": 2}})})})}),
    "twenty_properties": closed({f"field_{i}": {"type": "boolean"} for i in range(20)}),
    "const_object": closed({"version": {"const": 2}, "mode": {"const": "strict"}}),
    "string_with_escapes_pattern": {"type": "string", "pattern": '^[a-z"\\\\]{1,6}$'},
    "min_properties_optional": closed({"a": {"type": "boolean"}, "b": {"type": "boolean"}}, required=[]),
}
