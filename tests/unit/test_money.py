"""US dollars as commands and errors show them: cheap jobs' millionths stay visible."""

from __future__ import annotations

import pytest

from jobs.money import usd


@pytest.mark.parametrize(("amount", "places", "shown"), [
    (500, 2, "$500.00"),
    (1234.5, None, "$1,234.50"),
    (499.98, 4, "$499.9800"),
    (0.015, None, "$0.0150"),
    (0.0161, None, "$0.0161"),
    (0.0, None, "$0.0000"),
    (0.0001, 2, "$0.0001"),          # a budget of a hundredth of a cent is not $0.00
    (0.000019, None, "$0.000019"),   # one job on gpt-4o-mini is not $0.0000
    (0.000103, None, "$0.000103"),
    (-0.00002, None, "-$0.00002"),
    (0.0000163, None, "$0.000016"),  # to the millionth, as the API's amounts
    (1.96e-05, 4, "$0.000020"),
    (1e-12, None, "$0.000000"),      # below a millionth: zero, to 6 places
])
def test_usd_shows_the_digits_that_tell_an_amount_apart(
        amount: float, places: int | None, shown: str) -> None:
    assert usd(amount, places) == shown
