"""IMGSVC_API_KEYS and WEBHOOK_SECRET as start-up reads them: names, roles, the plain
form of earlier releases, and refusals that name the entry without showing the key."""

from __future__ import annotations

import pytest

from imgsvc import config_parsers, errors, settings

KEY_A, KEY_B, KEY_C = "k-shop-a-0123456789", "k-shop-b-0123456789", "k-ops-0123456789abcd"


def keys_of(raw: str) -> tuple[config_parsers.ApiKey, ...]:
    return settings.from_env({"IMGSVC_API_KEYS": raw}).api_keys


def refusal(variable: str, raw: str) -> str:
    with pytest.raises(errors.SettingsError) as caught:
        settings.from_env({variable: raw})
    return caught.value.message


def test_named_keys_have_roles_and_user_is_the_default() -> None:
    keys = keys_of(f"shop-a:{KEY_A}, shop-b:{KEY_B}:user ,ops:{KEY_C}:admin")
    assert [(k.name, k.key, k.role, k.admin) for k in keys] == [
        ("shop-a", KEY_A, "user", False),
        ("shop-b", KEY_B, "user", False),
        ("ops", KEY_C, "admin", True),
    ]


def test_plain_keys_are_admin_keys_named_by_a_hash_that_does_not_move() -> None:
    first = keys_of(f"{KEY_A},{KEY_B}")
    assert all(k.admin for k in first)
    names = {k.key: k.name for k in first}
    assert names == {k.key: k.name for k in keys_of(f"{KEY_B},{KEY_A},shop:{KEY_C}") if k.key != KEY_C}
    for key, name in names.items():
        assert name.startswith("key-") and len(name) == 12
        assert name[4:] not in key
    assert len(set(names.values())) == 2


def test_a_key_is_never_in_its_repr() -> None:
    (key,) = keys_of(f"shop-a:{KEY_A}")
    assert KEY_A not in repr(key) and KEY_A not in repr(settings.from_env({"IMGSVC_API_KEYS": KEY_A}))


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (f"shop-a:{KEY_A},shop-b:tiny-k3y", "entry 2 of 2: the key is shorter than 16 characters"),
        (f"{KEY_A},shop-b:{KEY_A}", "entry 2 of 2: the same key is given twice"),
        (f"shop:{KEY_A},shop:{KEY_B}", "entry 2 of 2: the name 'shop' is given twice"),
        (f"shop-a:{KEY_A}:root", "entry 1 of 1: the role must be admin or user"),
        (f"shop-a:{KEY_A}:Admin", "entry 1 of 1: the role must be admin or user"),
        (f"shop-a:{KEY_A}:admin:x", "entry 1 of 1: more than two ':'"),
        (f"shop a:{KEY_A}", "entry 1 of 1: a name is 1 to 64 letters"),
        (f":{KEY_A}", "entry 1 of 1: a name is 1 to 64 letters"),
    ],
)
def test_a_bad_entry_stops_start_up_naming_its_place_and_never_the_key(raw: str, problem: str) -> None:
    message = refusal("IMGSVC_API_KEYS", raw)
    assert message.startswith(f"IMGSVC_API_KEYS: {problem}"), message
    assert "\n" not in message
    for secret in (KEY_A, KEY_B, "tiny-k3y"):
        assert secret not in message


SECRET_OLD = "whsec_b2xkLXNlY3JldC1vZi1zb21lLWxlbmd0aA=="
SECRET_NEW = "whsec_bmV3LXNlY3JldC1vZi1zb21lLWxlbmd0aA=="


def test_webhook_secrets_are_space_separated() -> None:
    config = settings.from_env({"WEBHOOK_SECRET": f" {SECRET_NEW}  {SECRET_OLD} "})
    assert config.webhook_secret == (SECRET_NEW, SECRET_OLD)
    assert settings.from_env({"WEBHOOK_SECRET": "plain-text-secret"}).webhook_secret == ("plain-text-secret",)
    assert settings.from_env({}).webhook_secret == ()


def test_webhook_url_still_needs_a_secret() -> None:
    with pytest.raises(errors.SettingsError, match="WEBHOOK_SECRET: is required"):
        settings.from_env({"WEBHOOK_URL": "https://hooks.example.com/x"})


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (f"{SECRET_NEW} whsec_!!", "secret 2 of 2 starts with whsec_ but the rest is not base64"),
        (f"{SECRET_OLD} {SECRET_OLD}", "the same secret is given twice"),
    ],
)
def test_a_bad_webhook_secret_is_described_not_quoted(raw: str, problem: str) -> None:
    message = refusal("WEBHOOK_SECRET", raw)
    assert message == f"WEBHOOK_SECRET: {problem}"
    assert SECRET_OLD not in message and SECRET_NEW not in message
