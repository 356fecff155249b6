"""The built-in `arithmetic` tool set (`--tools arithmetic`): exact results the model can look up."""

import math


def add(a: float, b: float) -> float:
    """Add two numbers.

    Args:
        a: the first number
        b: the second number
    """
    return _number(a + b)


def subtract(a: float, b: float) -> float:
    """Subtract b from a.

    Args:
        a: the number to subtract from
        b: the number to subtract
    """
    return _number(a - b)


def multiply(a: float, b: float) -> float:
    """Multiply two numbers.

    Args:
        a: the first factor
        b: the second factor
    """
    return _number(a * b)


def divide(a: float, b: float) -> float:
    """Divide a by b.

    Args:
        a: the dividend
        b: the divisor (not zero)
    """
    return _number(a / b)


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("arguments must be numbers")
    if not math.isfinite(value) or abs(value) > 1e15:
        raise ValueError("result out of range")
    return int(value) if float(value).is_integer() else value  # "6", not "6.0", for whole results
