"""The OpenAPI 3.1 document of the HTTP API, served at /openapi.json and shown at /docs.

Written by hand next to the routes it describes; the e2e tests check the real
responses against it with schemathesis.
"""

from __future__ import annotations

from typing import Any

from imgsvc import __version__, models


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_NULLABLE_STRING = {"type": ["string", "null"]}
_NULLABLE_INT = {"type": ["integer", "null"]}
_TIME = {"type": ["string", "null"], "format": "date-time"}

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

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "A code, e.g. invalid_csv."},
            "message": {"type": "string", "description": "What was wrong, in words."},
        },
    },
    "CsvProblem": {
        "type": "object",
        "required": ["line", "message"],
        "properties": {
            "line": {"type": "integer", "minimum": 1},
            "column": {"type": "integer", "minimum": 1, "maximum": 3},
            "column_name": {"type": "string"},
            "message": {"type": "string"},
        },
    },
    "CsvError": {
        "allOf": [
            _ref("Error"),
            {
                "type": "object",
                "required": ["problem_count", "problems"],
                "properties": {
                    "problem_count": {"type": "integer"},
                    "problems": {"type": "array", "items": _ref("CsvProblem")},
                },
            },
        ],
    },
    "Accepted": {
        "type": "object",
        "required": ["request_id", "status", "products", "images", "status_url"],
        "properties": {
            "request_id": {"type": "string", "format": "uuid"},
            "status": {"const": "queued"},
            "products": {"type": "integer"},
            "images": {"type": "integer"},
            "status_url": {"type": "string"},
        },
    },
    "Counts": {
        "type": "object",
        "required": list(models.COUNTS),
        "properties": {name: {"type": "integer", "minimum": 0} for name in models.COUNTS},
    },
    "Image": {
        "type": "object",
        "properties": {
            "position": {"type": "integer"},
            "input_url": {"type": "string"},
            "status": {"enum": [s.value for s in models.ImageStatus]},
            "output_url": _NULLABLE_STRING,
            "error": _NULLABLE_STRING,
            "bytes_in": _NULLABLE_INT,
            "bytes_out": _NULLABLE_INT,
            "width": _NULLABLE_INT,
            "height": _NULLABLE_INT,
            "format_in": _NULLABLE_STRING,
            "format_out": _NULLABLE_STRING,
            "quality_in": _NULLABLE_INT,
            "quality_out": _NULLABLE_INT,
            "kept_original": {"type": ["boolean", "null"]},
            "attempts": {"type": "integer"},
        },
    },
    "Product": {
        "type": "object",
        "required": ["serial", "name", "position", "images"],
        "properties": {
            "serial": {"type": "string"},
            "name": {"type": "string"},
            "position": {"type": "integer"},
            "images": {"type": "array", "items": _ref("Image")},
        },
    },
    "Webhook": {
        "type": ["object", "null"],
        "properties": {
            "event_id": {"type": "string"},
            "state": {"enum": ["pending", "retrying", "delivered", "failed"]},
            "attempts": {"type": "integer"},
            "last_status": _NULLABLE_INT,
            "last_error": _NULLABLE_STRING,
            "delivered_at": _TIME,
        },
    },
    "RequestStatus": {
        "type": "object",
        "required": ["request_id", "status", "counts", "progress", "products", "page", "status_url"],
        "properties": {
            "request_id": {"type": "string", "format": "uuid"},
            "status": {"enum": [s.value for s in models.RequestStatus]},
            "file_name": _NULLABLE_STRING,
            "created_at": _TIME,
            "updated_at": _TIME,
            "started_at": _TIME,
            "completed_at": _TIME,
            "counts": _ref("Counts"),
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "bytes_in": {"type": "integer"},
            "bytes_out": {"type": "integer"},
            "status_url": {"type": "string"},
            "output_csv_url": _NULLABLE_STRING,
            "output_csv_download_url": {"type": "string"},
            "webhook": _ref("Webhook"),
            "products": {"type": "array", "items": _ref("Product")},
            "page": {
                "type": "object",
                "properties": {
                    "page": {"type": "integer"},
                    "per_page": {"type": "integer"},
                    "total_products": {"type": "integer"},
                    "next": _NULLABLE_STRING,
                },
            },
        },
    },
    "RequestList": {
        "type": "object",
        "required": ["requests", "page"],
        "properties": {
            "requests": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "request_id": {"type": "string"},
                        "status": {"enum": [s.value for s in models.RequestStatus]},
                        "file_name": _NULLABLE_STRING,
                        "counts": _ref("Counts"),
                        "percent": {"type": "number"},
                        "created_at": _TIME,
                        "completed_at": _TIME,
                        "status_url": {"type": "string"},
                    },
                },
            },
            "page": {
                "type": "object",
                "properties": {
                    "page": {"type": "integer"},
                    "per_page": {"type": "integer"},
                    "total": {"type": "integer"},
                    "next": _NULLABLE_STRING,
                },
            },
        },
    },
    "Cancelled": {
        "type": "object",
        "required": ["request_id", "status", "cancelled_images"],
        "properties": {
            "request_id": {"type": "string"},
            "status": {"type": "string"},
            "cancelled_images": {"type": "integer"},
            "status_url": {"type": "string"},
        },
    },
}


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    status_responses = {
        "200": _json(_ref("RequestStatus"), "The request's progress and a page of its products."),
        "404": _error("No request has this id."),
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
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Only when the server sets IMGSVC_API_KEYS.",
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
                                "application/json": {"schema": {"type": "object"}},
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
                    "responses": {
                        "200": _json({"type": "object", "properties": {"status": {"const": "ok"}}}, "Alive.")
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "The database answers, the schema is current, the store is reachable",
                    "security": [{}],
                    "responses": {
                        "200": _json({"type": "object"}, "Ready."),
                        "503": _json({"type": "object"}, "Not ready; checks says which part failed."),
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
                    "description": "Header `S. No.,Product Name,Input Image Urls`; one product a row; the "
                    "image URLs comma-separated in one quoted cell. The whole file is checked "
                    "before anything is stored.",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string", "maxLength": 255},
                            "description": "Repeat an upload safely: the same key gives the same request.",
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
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": _json(_ref("Accepted"), "Stored and queued; follow status_url."),
                        "303": {"description": "For a browser (Accept: text/html): to the request's page."},
                        "400": _error("The form is malformed, has no file, or has two."),
                        "413": _error("The upload is over IMGSVC_MAX_CSV_BYTES."),
                        "415": _error("The body is not multipart/form-data."),
                        "422": _json(
                            {"anyOf": [_ref("CsvError"), _ref("Error")]},
                            "The CSV has problems (each with its line and column), the webhook_url "
                            "is refused, or the Idempotency-Key was used for another file.",
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
                        "200": _json(_ref("RequestList"), "A page of requests."),
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
                                "application/json": {"schema": _ref("RequestStatus")},
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
                        "202": _json(_ref("Cancelled"), "Queued images cancelled."),
                        "404": _error("No request has this id."),
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
                        "404": _error("No request has this id."),
                        "409": _error("The request is not finished yet."),
                        "422": _error("The id is not a UUID."),
                        **_COMMON_ERRORS,
                    },
                }
            },
        },
    }
