import pytest

from search.budget import parse_budget
from search.errors import ArchtreeError


def test_budgets_in_ms_and_percent():
    assert parse_budget("8ms").resolve(20.0) == 8.0
    assert parse_budget(" 2.5 ms ").resolve(20.0) == 2.5
    assert parse_budget("60%").resolve(20.0) == pytest.approx(12.0)


@pytest.mark.parametrize(
    "text", ["0ms", "0%", "-5ms", "abc", "8", "", "150%", "100%", "ms", "1e309ms"]
)
def test_bad_budgets_say_what_to_give(text):
    with pytest.raises(ArchtreeError) as error:
        parse_budget(text)
    assert "budget" in str(error.value).lower()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text", ["1e308ms", "1000001ms", "1e309ms"])
def test_a_budget_of_more_than_a_quarter_hour_is_refused_as_too_large(text):
    with pytest.raises(ArchtreeError) as error:
        parse_budget(text)
    assert str(error.value) == (
        f"the budget {text!r} is too large: give at most 1,000,000 ms, like 8ms."
    )
    assert parse_budget("1000000ms").resolve(20.0) == 1_000_000.0
