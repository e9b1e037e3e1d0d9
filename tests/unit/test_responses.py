"""The response shapes and the schemas generated from them: a body with a key added or
taken away is refused, so the API cannot drift from its document unseen."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jsonschema_rs  # schemathesis's own validator, installed with it
import pytest

from imgsvc import errors, models, openapi, responses

BASE = "http://localhost:8000"
RID = "0b7e4a8e-0000-4000-8000-000000000001"
TIME = "2026-11-26T10:00:00.123456+00:00"


def _status() -> responses.RequestStatus:
    """A status body as GET /status builds it, with one done and one failed image."""
    image: dict[str, Any] = {
        "position": 1,
        "input_url": "https://cdn.example/a.jpg",
        "status": models.ImageStatus.DONE,
        "output_url": "https://bucket.example/a.jpg",
        "error": None,
        "bytes_in": 2000,
        "bytes_out": 900,
        "width": 640,
        "height": 480,
        "format_in": "jpeg",
        "format_out": "jpeg",
        "quality_in": 90,
        "quality_out": 45,
        "kept_original": False,
        "attempts": 1,
        "reused": models.ReuseReason.SAME_CONTENT,
        "bytes_saved": 900,
    }
    failed = image | {"position": 2, "status": models.ImageStatus.FAILED, "error": "404"}
    failed |= dict.fromkeys(
        ("output_url", "bytes_in", "bytes_out", "width", "height", "reused", "bytes_saved"), None
    )
    return responses.RequestStatus(
        request_id=RID,
        status=models.RequestStatus.COMPLETED_WITH_ERRORS,
        file_name="products.csv",
        owner="shop-a",
        created_at=TIME,
        updated_at=TIME,
        started_at=TIME,
        completed_at=None,
        counts=responses.Counts(total=2, queued=0, processing=0, done=1, failed=1, cancelled=0),
        reuse=responses.Reuse(compressed=0, reused=1, bytes_saved=900, reprocess=False),
        progress=1.0,
        bytes_in=2000,
        bytes_out=900,
        status_url=f"{BASE}/status/{RID}",
        output_csv_url=None,
        output_csv_download_url=f"{BASE}/requests/{RID}/output.csv",
        webhook=responses.Webhook(
            event_id="evt_1",
            state=models.DeliveryState.DELIVERED,
            attempts=1,
            last_status=200,
            last_error=None,
            delivered_at=TIME,
        ),
        products=[
            responses.Product(
                serial="1.",
                name="A",
                position=1,
                images=[responses.Image(**image), responses.Image(**failed)],
            )
        ],
        page=responses.ProductPage(page=1, per_page=100, total_products=1, next=None),
    )


def _validator(name: str) -> Any:
    """A validator of one component, its references resolved within the document."""
    document = openapi.document()
    return jsonschema_rs.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    )


def test_every_field_is_required_and_no_other_key_is_allowed() -> None:
    for shape in responses.SHAPES:
        schema = openapi.schema(shape)
        fields = [field.name for field in dataclasses.fields(shape)]
        assert list(schema["properties"]) == fields, shape
        assert schema["additionalProperties"] is False, shape
        omitted = {"column", "column_name"} if shape is responses.Problem else set()
        assert schema["required"] == [name for name in fields if name not in omitted], shape


def test_the_document_publishes_the_generated_components() -> None:
    document = openapi.document()
    assert document["components"]["schemas"] == openapi.components()
    refs = {
        value.removeprefix("#/components/schemas/")
        for value in _strings_under(document, "$ref")
        if value.startswith("#/components/schemas/")
    }
    assert refs <= set(document["components"]["schemas"])
    json.dumps(document)  # plain JSON values only


def _strings_under(value: Any, key: str) -> list[str]:
    if isinstance(value, dict):
        found = [value[key]] if isinstance(value.get(key), str) else []
        return found + [s for item in value.values() for s in _strings_under(item, key)]
    if isinstance(value, list):
        return [s for item in value for s in _strings_under(item, key)]
    return []


def test_a_status_body_is_valid_and_an_added_or_missing_key_is_not() -> None:
    validator = _validator("RequestStatus")
    body = responses.to_dict(_status())
    assert list(body) == [field.name for field in dataclasses.fields(responses.RequestStatus)]
    assert validator.is_valid(body)
    assert not validator.is_valid(body | {"new_column": 1})
    assert not validator.is_valid({k: v for k, v in body.items() if k != "file_name"})
    image = body["products"][0]["images"][0]
    for changed in (image | {"product_id": 7}, {k: v for k, v in image.items() if k != "attempts"}):
        nested = json.loads(json.dumps(body))
        nested["products"][0]["images"][0] = changed
        assert not validator.is_valid(nested)
    assert validator.is_valid(body | {"webhook": None})
    assert not validator.is_valid(body | {"webhook": body["webhook"] | {"payload": "{}"}})


def test_a_problem_leaves_out_its_column_rather_than_sending_null() -> None:
    refused = errors.CsvInvalid(
        [
            {"line": 2, "column": 1, "column_name": "S. No.", "message": "not a serial number"},
            {"line": 3, "message": "expected 3 columns, found 2"},
        ],
        total=2,
    )
    body = refused.to_json()
    assert body["problems"][1] == {"line": 3, "message": "expected 3 columns, found 2"}
    assert list(body) == ["error", "message", "problem_count", "problems"]
    validator = _validator("CsvError")
    assert validator.is_valid(body)
    assert not validator.is_valid(body | {"problems": [{"line": 3, "column": None, "message": "x"}]})
    assert not _validator("Error").is_valid(body)  # the 422 is CsvError's, not a bare Error's


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("Error", responses.Error(error="http_error", message="no request with id x")),
        ("Health", responses.Health(status="ok", version="0.2.0", schema=None)),
        (
            "Health",
            responses.Health(
                status="ok",
                version="0.2.0",
                schema=responses.SchemaVersion(imgsvc=11, procrastinate="03.04.00_50_post_x", pending=[]),
            ),
        ),
        (
            "Ready",
            responses.Ready(
                status="not ready", checks=responses.Checks(database="ok", schema="ok", store="not answering")
            ),
        ),
        (
            "Cancelled",
            responses.Cancelled(
                request_id=RID,
                status=models.RequestStatus.PROCESSING,
                cancelled_images=3,
                status_url=f"{BASE}/status/{RID}",
            ),
        ),
        (
            "Accepted",
            responses.Accepted(
                request_id=RID,
                status="queued",
                products=1,
                images=2,
                status_url=f"{BASE}/status/{RID}",
                warning_count=3,
                warnings=[
                    responses.CsvWarning(
                        line=2, message="4 cells; the image URLs were not quoted and were read as one list"
                    )
                ],
            ),
        ),
    ],
)
def test_each_small_body_is_valid_and_refuses_an_extra_key(name: str, shape: Any) -> None:
    validator = _validator(name)
    body = responses.to_dict(shape)
    assert validator.is_valid(body)
    assert not validator.is_valid(body | {"extra": True})
    assert not validator.is_valid(dict(list(body.items())[1:]))
