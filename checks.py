"""
The one check that every boundary (config, processor, generate, command line) makes of the numbers it is given:
the type and the range, with a message that names the argument, its value and what is allowed.
"""
import math
import numbers


def check_number(name, value, low=None, high=None, *, integer=False, low_open=False):
    """
    Returns `value` if it is an integer (integer=True) or a finite real number with low <= value <= high
    (low < value with low_open; None: unbounded). Otherwise raises TypeError (not a number of that kind; bools are
    refused) or ValueError, as '<name>=<value>: must be <what is allowed>', e.g.
    "top_p=0: must be a finite number in (0, 1]".
    """
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        allowed = f"{kind} in {'(' if low_open else '['}{low}, {high}]"
    elif low is not None:
        allowed = f"{kind} {'>' if low_open else '>='} {low}"
    elif high is not None:
        allowed = f"{kind} <= {high}"
    else:
        allowed = kind
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise TypeError(f"{name}={value!r}: must be {allowed}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if (not integer and not math.isfinite(value)) or too_low or (high is not None and value > high):
        raise ValueError(f"{name}={value!r}: must be {allowed}")
    return value
