"""Addresses: parsing what users type, printing it back (IPv6 in brackets)."""

from __future__ import annotations

import pytest

import zchat_nb
from zchat_nb.net import format_address, parse_address


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:8100", ("127.0.0.1", 8100)),
        (" localhost:9 ", ("localhost", 9)),
        ("8100", ("127.0.0.1", 8100)),
        ("[::1]:8100", ("::1", 8100)),
        (("10.0.0.2", 8100), ("10.0.0.2", 8100)),
        (["h", 1], ("h", 1)),
    ],
)
def test_addresses_are_parsed(given: object, expected: tuple[str, int]) -> None:
    assert parse_address(given) == expected


@pytest.mark.parametrize(
    "bad", ["host:port", "h:0", "h:70000", "", 8100, ("h",), ("h", "1"), ("h", True), None]
)
def test_bad_addresses_name_the_value_and_the_form(bad: object) -> None:
    with pytest.raises(zchat_nb.ZChatConnectionError, match=r"127\.0\.0\.1:8100"):
        parse_address(bad)


@pytest.mark.parametrize(
    ("address", "text"), [(("127.0.0.1", 8100), "127.0.0.1:8100"), (("::1", 8100), "[::1]:8100")]
)
def test_addresses_print_as_they_parse(address: tuple[str, int], text: str) -> None:
    assert format_address(address) == text
    assert parse_address(text) == address
