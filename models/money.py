"""Currency precision: DR sends floats in major units; we keep exact decimals."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from babel.numbers import get_currency_precision, is_currency

from models.errors import InvalidEvent

# Larger than any real order, small enough for NUMERIC(20, 4) columns.
MAX_AMOUNT = Decimal("1e15")


def check_currency(code: str) -> str:
    """Return the ISO 4217 code, upper-cased, or raise InvalidEvent."""
    upper = code.upper()
    if len(upper) != 3 or not is_currency(upper):
        raise InvalidEvent(f"unknown currency {code[:16]!r}")
    return upper


def to_minor_unit(amount: Decimal, currency: str) -> Decimal:
    """Round to the currency's minor unit (cents for USD, none for JPY)."""
    # copy_abs, not abs(): abs() rounds to the context, and 1e999999999 overflows it.
    if not amount.is_finite() or amount.copy_abs() >= MAX_AMOUNT:
        raise InvalidEvent(f"amount {str(amount)[:32]} is out of range")
    exponent = Decimal(1).scaleb(-get_currency_precision(currency))
    try:
        return amount.quantize(exponent, rounding=ROUND_HALF_EVEN)
    except InvalidOperation:
        raise InvalidEvent(f"amount {str(amount)[:32]} is out of range") from None


def zero(currency: str | None) -> Decimal:
    """Zero written with the currency's minor unit, e.g. 0.00 for USD."""
    return to_minor_unit(Decimal(0), currency) if currency else Decimal("0.00")
