"""Argument checks that produce the project's standard error messages.

Every message names the argument, the value it got and what is allowed, so that a bad
input never turns into a silent wrong answer further down.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_choice(arg: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise ``ValueError`` naming them."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{arg}={value!r} is not allowed; expected one of {allowed}")
    return value


def check_positive_int(arg: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{arg}={value!r} is not allowed; expected an integer >= {minimum}")
    return value


def check_positive_float(arg: str, value: Any, allow_zero: bool = False) -> float:
    """Return ``value`` as float if it is a finite number > 0 (or >= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and value != float("inf") and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{arg}={value!r} is not allowed; expected a finite number {bound}")
    return float(value)


def refuse_key_padding_mask(value: Any) -> None:
    """Raise ``TypeError`` if the removed ``key_padding_mask`` keyword was given.

    formerlab's mask is ``attention_mask`` (bool (B, N), True = real token, the meaning of
    Hugging Face's ``attention_mask``). The old name meant the same, the opposite of
    ``torch.nn.MultiheadAttention``'s ``key_padding_mask`` (True = ignore): a PyTorch user's
    usual mask would have masked every real token, silently. So the old name is refused.
    """
    if value is not None:
        raise TypeError(
            "key_padding_mask= is not accepted: pass attention_mask= (bool (B, N), True = real "
            "token, as Hugging Face's attention_mask). A torch.nn.MultiheadAttention-style "
            "key_padding_mask (True = padding) converts as attention_mask=~key_padding_mask"
        )
