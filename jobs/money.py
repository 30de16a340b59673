"""US dollars as a person reads them: the digits that tell an amount apart, and no more."""

from __future__ import annotations

#: Most decimals shown: millionths of a dollar, the precision of the API's amounts.
MAX_PLACES = 6


def usd(amount: float, places: int | None = None) -> str:
    """``$1,234.50``: ``places`` decimals (by default cents from a dollar up, else four), or
    more while fewer would show a non-zero amount more than 1% off. A job on a small model
    costs millionths of a dollar, which four decimals would show as ``$0.0000``:
    ``usd(0.000019)`` is ``$0.000019``."""
    if places is None:
        places = 2 if abs(amount) >= 1 else 4
    text = f"{amount:,.{places}f}"
    while (amount and places < MAX_PLACES
           and abs(float(text.replace(",", "")) - amount) > 0.01 * abs(amount)):
        places += 1
        text = f"{amount:,.{places}f}"
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"
