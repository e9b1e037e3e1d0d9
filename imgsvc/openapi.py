"""The OpenAPI 3.1 document of the HTTP API, served at /openapi.json and shown at /docs.

The paths are written by hand next to the routes they describe; the schemas of the
bodies are generated from their one declaration, the shapes in responses.py. The e2e
tests check the real responses against the document with schemathesis.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Annotated, Any, Literal

from imgsvc import __version__, models, responses


def _ref(shape: type) -> dict[str, str]:
    """A reference to a shape's schema among the components."""
    return {"$ref": f"#/components/schemas/{shape.__name__}"}


def _type_schema(hint: Any) -> dict[str, Any]:
    """The JSON Schema of one field's type (a reference, for another shape)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        out = _type_schema(args[0])
        for extra in args[1:]:
            if isinstance(extra, responses.Schema):
                out |= extra.keywords
        return out
    if origin in (types.UnionType, typing.Union):
        kept = [arg for arg in args if arg is not type(None)]
        if len(kept) != 1:
            raise TypeError(f"only X | None unions are supported, not {hint}")
        inner = _type_schema(kept[0])
        if len(kept) == len(args):
            return inner
        if isinstance(inner.get("type"), str):
            return inner | {"type": [inner["type"], "null"]}
        return {"anyOf": [inner, {"type": "null"}]}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is Literal:
        return {"const": args[0]} if len(args) == 1 else {"enum": list(args)}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [member.value for member in hint]}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _ref(hint)
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if hint in simple:
        return {"type": simple[hint]}
    raise TypeError(f"no JSON Schema for {hint!r}")


def schema(shape: type) -> dict[str, Any]:
    """A shape's JSON Schema: every field not OMIT is required; no other key is allowed."""
    properties: dict[str, Any] = {}
    required = []
    for name, hint, omit in responses.fields(shape):
        if omit:  # absent rather than null: the schema is of the value when present
            base, *extras = typing.get_args(hint)
            hint = Annotated[(next(a for a in typing.get_args(base) if a is not type(None)), *extras)]
        else:
            required.append(name)
        properties[name] = _type_schema(hint)
    out: dict[str, Any] = {"type": "object"}
    if shape.__doc__:
        out["description"] = " ".join(shape.__doc__.split())
    return out | {"required": required, "properties": properties, "additionalProperties": False}


def components() -> dict[str, Any]:
    """The JSON Schema of every shape, by name: the OpenAPI document's components."""
    return {shape.__name__: schema(shape) for shape in responses.SHAPES}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref(responses.Error), description)


_REQUEST_ID = {
    "name": "request_id",
    "in": "path",
    "required": True,
    "description": "The request id returned by POST /upload (a UUID).",
    "schema": {"type": "string", "format": "uuid"},
}
_PAGE = {
    "name": "page",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 10_000_000, "default": 1},
}
_PER_PAGE = {
    "name": "per_page",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
}
_COMMON_ERRORS = {
    "401": _error("An API key is needed (only when the server has IMGSVC_API_KEYS)."),
    "503": _error(
        "The database is not answering, or rolled the change back over a conflict with "
        "another (a deadlock); try again after Retry-After seconds."
    ),
}


# A request another user key owns is answered as an unknown one, so an id tells nothing.
_NOT_FOUND = _error("No request has this id, or it is another API key's (a user key sees only its own).")


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    status_responses = {
        "200": _json(_ref(responses.RequestStatus), "The request's progress and a page of its products."),
        "404": _NOT_FOUND,
        "422": _error("The id is not a UUID, or a query parameter is out of range."),
        **_COMMON_ERRORS,
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imgsvc",
            "version": __version__,
            "description": "Compress product images in bulk: upload a CSV of image URLs, follow its "
            "progress, download the output CSV.",
        },
        "components": {
            "schemas": components(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Only when the server sets IMGSVC_API_KEYS. A user key sees only the"
                    " requests it uploaded; an admin key, all of them.",
                }
            },
        },
        "security": [{}, {"bearer": []}],
        "paths": {
            "/": {
                "get": {
                    "summary": "This service, or the upload page for a browser",
                    "responses": {
                        "200": {
                            "description": "JSON links, or the HTML upload page (Accept: text/html).",
                            "content": {
                                "application/json": {"schema": _ref(responses.Service)},
                                "text/html": {"schema": {"type": "string"}},
                            },
                        },
                        **_COMMON_ERRORS,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "The process is alive",
                    "security": [{}],
                    "responses": {"200": _json(_ref(responses.Health), "Alive.")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "The database answers, the schema is current, the store is reachable",
                    "security": [{}],
                    "responses": {
                        "200": _json(_ref(responses.Ready), "Ready."),
                        "503": _json(_ref(responses.Ready), "Not ready; checks says which part failed."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_COMMON_ERRORS,
                    },
                }
            },
            "/upload": {
                "post": {
                    "summary": "Upload a CSV of products and their image URLs",
                    "description": "Header `S. No.,Product Name,Input Image Urls` (or aliases of those "
                    "names); one product a row; the image URLs in one quoted cell, separated by commas, `|` "
                    "or line breaks, or unquoted in the cells after the name (then the 202 warns so). The "
                    "whole file is checked before anything is stored.",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string", "maxLength": 255},
                            "description": "Repeat an upload safely: the same key from the same API key"
                            " gives the same request.",
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["file"],
                                    "properties": {
                                        "file": {
                                            "type": "string",
                                            "format": "binary",
                                            "description": "The CSV, as a file part.",
                                        },
                                        "webhook_url": {"type": "string", "format": "uri"},
                                        "reprocess": {
                                            "type": "string",
                                            "enum": ["true", "false"],
                                            "description": "true: compress every image again, "
                                            "reusing no stored result (our own outputs are still "
                                            "never compressed twice).",
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": _json(_ref(responses.Accepted), "Stored and queued; follow status_url."),
                        "303": {"description": "For a browser (Accept: text/html): to the request's page."},
                        "400": _error("The form is malformed, has no file, or has two."),
                        "413": _error("The upload is over IMGSVC_MAX_CSV_BYTES."),
                        "415": _error("The body is not multipart/form-data."),
                        "422": _json(
                            {"anyOf": [_ref(responses.CsvError), _ref(responses.Error)]},
                            "The CSV has problems (each with its line and column), the webhook_url "
                            "or reprocess field is refused, or the Idempotency-Key was used for "
                            "another file.",
                        ),
                        **_COMMON_ERRORS,
                    },
                }
            },
            "/status/{request_id}": {
                "get": {
                    "summary": "A request's progress, with a page of its products and images",
                    "parameters": [_REQUEST_ID, _PAGE, _PER_PAGE],
                    "responses": status_responses,
                }
            },
            "/requests": {
                "get": {
                    "summary": "Requests, newest first",
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {"enum": [s.value for s in models.RequestStatus]},
                        },
                        _PAGE,
                        _PER_PAGE,
                    ],
                    "responses": {
                        "200": _json(_ref(responses.RequestList), "A page of requests."),
                        "422": _error("A query parameter is out of range."),
                        **_COMMON_ERRORS,
                    },
                }
            },
            "/requests/{request_id}": {
                "get": {
                    "summary": "A request: its status as JSON, or its page for a browser",
                    "parameters": [_REQUEST_ID, _PAGE, _PER_PAGE],
                    "responses": {
                        **status_responses,
                        "200": {
                            "description": "The status JSON, or the HTML page (Accept: text/html).",
                            "content": {
                                "application/json": {"schema": _ref(responses.RequestStatus)},
                                "text/html": {"schema": {"type": "string"}},
                            },
                        },
                    },
                }
            },
            "/requests/{request_id}/cancel": {
                "post": {
                    "summary": "Cancel a request's queued images; it ends 'cancelled'",
                    "parameters": [_REQUEST_ID],
                    "responses": {
                        "202": _json(_ref(responses.Cancelled), "Queued images cancelled."),
                        "404": _NOT_FOUND,
                        "409": _error("The request has already finished."),
                        "422": _error("The id is not a UUID."),
                        **_COMMON_ERRORS,
                    },
                }
            },
            "/requests/{request_id}/output.csv": {
                "get": {
                    "summary": "The output CSV: the input columns plus Output Image Urls",
                    "parameters": [_REQUEST_ID],
                    "responses": {
                        "200": {
                            "description": "The CSV.",
                            "content": {"text/csv": {"schema": {"type": "string"}}},
                        },
                        "404": _NOT_FOUND,
                        "409": _error("The request is not finished yet."),
                        "422": _error("The id is not a UUID."),
                        **_COMMON_ERRORS,
                    },
                }
            },
        },
    }
