import pytest

from wattkeeper.units import format_power, parse_duration_s, parse_power_w


@pytest.mark.parametrize(
    ("text", "watts"),
    [
        ("18kW", 18000.0),
        ("18 kW", 18000.0),
        ("750W", 750.0),
        ("750", 750.0),
        ("1.5MW", 1.5e6),
        ("0.5kw", 500.0),
        (" 2 mw ", 2e6),
        (300, 300.0),
    ],
)
def test_power_units(text, watts):
    assert parse_power_w(text) == pytest.approx(watts)


@pytest.mark.parametrize(
    "text", ["18 kilowatts", "-5kW", "0", "0kW", "kW", "", "18kWh", "1e3W", "nan", "18 k W", -1]
)
def test_power_refuses_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match=r"invalid power"):
        parse_power_w(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600.0), ("90s", 90.0), ("1.5h", 5400.0), ("250ms", 0.25), ("42", 42.0)],
)
def test_duration_units(text, seconds):
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10 minutes", "-1m", "0s", "m"])
def test_duration_refuses(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration_s(text)


def test_format_power_picks_a_readable_unit():
    assert format_power(750) == "750 W"
    assert format_power(18000) == "18.0 kW"
    assert format_power(1_500_000) == "1.50 MW"
    assert format_power(None) == "-"
