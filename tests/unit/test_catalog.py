"""The pure rules of catalog reuse: when two source URLs are one, and what validators say."""

from __future__ import annotations

import pytest

from imgsvc import catalog, compress


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("HTTP://Shop.Example/A.jpg", "http://shop.example/A.jpg"),
        ("https://shop.example:443/a.jpg", "https://shop.example/a.jpg"),
        ("http://127.0.0.1:8000/A.jpg?B=C", "http://127.0.0.1:8000/A.jpg?B=C"),  # as it was
        ("http://shop.example:8080/a", "http://shop.example:8080/a"),
        ("http://shop.example?Q=1", "http://shop.example?Q=1"),
        ("http://shop.example:80/a.jpg?x=1", "http://shop.example/a.jpg?x=1"),
        ("http://shop.example:8080/a.jpg", "http://shop.example:8080/a.jpg"),
        ("https://shop.example:80/a.jpg", "https://shop.example:80/a.jpg"),  # not https' default
        ("http://User:Pass@Shop.Example:80/a", "http://User:Pass@shop.example/a"),
        ("http://[2001:DB8::1]:80/a", "http://[2001:db8::1]/a"),
        ("https://shop.example", "https://shop.example"),
        ("https://shop.example?q", "https://shop.example?q"),
        ("https://shop.example/a%2Fb/./c?Q=A#F", "https://shop.example/a%2Fb/./c?Q=A#F"),  # nothing else
    ],
)
def test_a_source_url_is_its_scheme_and_host_in_lower_case_without_a_default_port(
    url: str, normal: str
) -> None:
    assert catalog.normalize_url(url) == normal
    assert catalog.normalize_url(normal) == normal


def test_only_strong_etags_are_kept() -> None:
    assert catalog.strong_etag('"abc"') == '"abc"'
    assert catalog.strong_etag(' "abc" ') == '"abc"'
    for weak_or_malformed in ('W/"abc"', "abc", '"', "", None, '"' + "x" * 600 + '"'):
        assert catalog.strong_etag(weak_or_malformed) is None


def test_validators_ask_with_what_the_origin_sent() -> None:
    both = catalog.Validators('"e"', "Tue, 14 Nov 2023 22:13:20 GMT")
    assert both.headers() == {"If-None-Match": '"e"', "If-Modified-Since": "Tue, 14 Nov 2023 22:13:20 GMT"}
    assert catalog.Validators(None, None).headers() == {} and not catalog.Validators()
    assert catalog.Validators('"e"')


def test_the_settings_key_changes_with_what_shapes_the_bytes() -> None:
    base = compress.Limits()
    assert compress.settings_key(base) == compress.settings_key(compress.Limits())
    assert compress.settings_key(base) != compress.settings_key(compress.Limits(quality_factor=0.3))
    assert compress.settings_key(base) != compress.settings_key(compress.Limits(optimize_max_pixels=1))
    # Limits that only refuse sources do not make other bytes.
    assert compress.settings_key(base) == compress.settings_key(compress.Limits(max_pixels=1000))
    assert "libvips=" in compress.settings_key(base) and f"rules={compress.RULES}" in compress.settings_key(
        base
    )
