"""Sizes and names: the grammar operators type."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockd.errors import BadInput
from blockd.sizes import MAX_VOLUME_SIZE, check_name, check_volume_size, format_size, parse_size, parse_volume_size


@pytest.mark.parametrize(
    "text,expected",
    [
        ("4096", 4096),
        ("1K", 1024),
        ("1KiB", 1024),
        ("1kib", 1024),
        ("1KB", 1000),
        ("8G", 8 << 30),
        ("8GiB", 8 << 30),
        ("1GB", 10**9),
        ("16TiB", 16 << 40),
        ("241PiB", 241 << 50),
        ("1E", 1 << 60),
        ("2EB", 2 * 10**18),
        ("1.5G", 3 << 29),
        (" 10M ", 10 << 20),
        ("512B", 512),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1", "10XB", "1.5", "0.1B", "1..2G", "G", "1 2"])
def test_parse_size_refuses(text):
    with pytest.raises(BadInput):
        parse_size(text)


def test_volume_size_rules():
    assert parse_volume_size("8GiB") == 8 << 30
    with pytest.raises(BadInput, match="positive"):
        parse_volume_size("0")
    with pytest.raises(BadInput, match="nearest valid size is 4096"):
        parse_volume_size("4097")
    with pytest.raises(BadInput, match="nearest valid size is 8192"):
        parse_volume_size("6145")
    with pytest.raises(BadInput, match="nearest valid size is 1000001536"):
        parse_volume_size("1GB")
    with pytest.raises(BadInput, match="nearest valid size is 4096"):
        parse_volume_size("1")
    with pytest.raises(BadInput, match=str(MAX_VOLUME_SIZE)):
        parse_volume_size("8EiB")
    assert check_volume_size(MAX_VOLUME_SIZE) == MAX_VOLUME_SIZE
    assert MAX_VOLUME_SIZE <= 2**63 - 1 and MAX_VOLUME_SIZE % 4096 == 0


@given(st.integers(min_value=1, max_value=MAX_VOLUME_SIZE))
def test_size_validation_property(n):
    if n % 4096:
        with pytest.raises(BadInput) as info:
            check_volume_size(n)
        # the suggestion is itself valid and within one block
        nearest = int(str(info.value).split("nearest valid size is ")[1].split()[0])
        assert nearest % 4096 == 0 and 0 < nearest <= MAX_VOLUME_SIZE and abs(nearest - n) < 4096
    else:
        assert check_volume_size(n) == n


@given(st.integers(min_value=0, max_value=2**62))
def test_format_then_parse_round_trips_exact_sizes(n):
    text = format_size(n)
    if "." not in text:
        assert parse_size(text) == n


@pytest.mark.parametrize("name", ["a", "vol0", "db-1.prod_2", "0", "a" * 63])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "Bad", "-x", ".x", "_x", "a/b", "a b", "a" * 64, "é", "vol\n"])
def test_bad_names(name):
    with pytest.raises(BadInput):
        check_name(name)
