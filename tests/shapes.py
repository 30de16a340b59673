"""Request shapes the provider tests share: a function tool, a strict ``json_schema``
response format and a tiny inline image."""

from __future__ import annotations

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather at a place",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                   "required": ["location"]}}}
PERSON = {"type": "json_schema", "json_schema": {
    "name": "person", "strict": True,
    "schema": {"type": "object", "properties": {"name": {"type": "string"}},
               "required": ["name"], "additionalProperties": False}}}
IMAGE = "data:image/png;base64,iVBORw0KGgo="
