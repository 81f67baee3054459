"""Session ids and key names: an id checks only for the tenant it was issued to and under a key the
server has; nothing a client sends can reach a key outside its tenant's namespace."""

from __future__ import annotations

import base64
import logging

import pytest

from runtime.errors import ConfigError, InvalidInput, PermissionDenied
from runtime.sessions.ids import ID_LENGTH, SessionIds, parse_key
from runtime.sessions.keys import SessionKeys, check_session, check_tenant, prediction_key

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_an_id_checks_for_its_tenant_only():
    ids = SessionIds([KEY])
    session = ids.new("acme")
    assert len(session) == ID_LENGTH and set(session) <= set(ALPHABET)
    assert ids.check("acme", session) == session
    assert len({ids.new("acme") for _ in range(1000)}) == 1000
    with pytest.raises(PermissionDenied, match="not issued to this tenant"):
        ids.check("globex", session)
    with pytest.raises(PermissionDenied):
        SessionIds([OTHER_KEY]).check("acme", session)


def test_no_changed_character_makes_another_valid_id():
    ids = SessionIds([KEY])
    session = ids.new("acme")
    for position in range(len(session)):
        for replacement in ALPHABET:
            if replacement != session[position]:
                forged = session[:position] + replacement + session[position + 1:]
                with pytest.raises((PermissionDenied, InvalidInput)):
                    ids.check("acme", forged)


@pytest.mark.parametrize("session", ["", "short", "x" * 42 + "=", "x" * 44, "../" * 15, None, 7, "é" * 43])
def test_what_is_not_an_id_is_invalid_input(session):
    with pytest.raises(InvalidInput, match="not a session id"):
        SessionIds([KEY]).check("acme", session)


def test_keys_rotate_the_first_issues_and_all_check():
    old = SessionIds([KEY]).new("acme")
    rotated = SessionIds([OTHER_KEY, KEY])
    assert rotated.check("acme", old) == old
    assert SessionIds([OTHER_KEY]).check("acme", rotated.new("acme"))


def test_the_key_comes_from_the_environment_as_hex_or_base64():
    hex_key, b64_key = KEY.hex(), base64.b64encode(KEY).decode()
    session = SessionIds.from_env({"KILN_SESSION_KEY": hex_key}).new("acme")
    url_safe = base64.urlsafe_b64encode(KEY).decode().rstrip("=")
    for text in (hex_key, b64_key, url_safe, f" {OTHER_KEY.hex()}, {b64_key}"):
        assert SessionIds.from_env({"KILN_SESSION_KEY": text}).check("acme", session) == session
    assert parse_key(hex_key.upper()) == KEY


@pytest.mark.parametrize("text, message", [("00" * 16, "at least 32 bytes"), ("not a key!", "hex or base64"),
                                           (base64.b64encode(b"x" * 31).decode(), "at least 32 bytes")])
def test_a_weak_or_unreadable_key_fails_the_start(text, message):
    with pytest.raises(ConfigError, match=message):
        SessionIds.from_env({"KILN_SESSION_KEY": text})


def test_without_a_key_each_process_makes_its_own_and_warns(caplog):
    with caplog.at_level(logging.WARNING):
        first, second = SessionIds.from_env({}), SessionIds.from_env({})
    assert "KILN_SESSION_KEY is not set" in caplog.text
    session = first.new("acme")
    assert first.check("acme", session) == session
    with pytest.raises(PermissionDenied):
        second.check("acme", session)


@pytest.mark.parametrize("tenant", ["", "a:b", "a}b", "{a", "a b", "a\nb", "a*", "x" * 65, None, "é"])
def test_tenants_that_could_change_a_key_are_refused(tenant):
    with pytest.raises(InvalidInput, match="tenant"):
        check_tenant(tenant)
    with pytest.raises(InvalidInput):
        SessionKeys(tenant, "s1")
    with pytest.raises(InvalidInput):
        SessionIds([KEY]).new(tenant)


@pytest.mark.parametrize("session", ["", "a:b", "a}b", "a{", "a/b", "a.b", "x" * 129])
def test_session_ids_that_could_change_a_key_are_refused(session):
    with pytest.raises(InvalidInput, match="session id"):
        check_session(session)


def test_every_key_of_a_session_carries_its_hash_tag():
    keys = SessionKeys("tenant-a.b_c", "Zz09-_")
    assert keys.manifest == "kiln:{tenant-a.b_c:Zz09-_}:manifest"
    assert keys.history == "kiln:{tenant-a.b_c:Zz09-_}:history"
    assert keys.chunk("00ff", 2, 3) == "kiln:{tenant-a.b_c:Zz09-_}:chunk:00ff:2:3"
    assert prediction_key("acme", "ab") == "kiln:prediction:acme:ab"
