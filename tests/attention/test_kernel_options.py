"""Constructor options and call flags of every registered kernel are validated up front.

Bad values must raise ``ValueError`` naming the kernel, the option and the value before
the kernel is built (never a ``TypeError`` deep inside SDPA, never a silently accepted
negative scale); a new kernel is covered without editing this file.
"""

import inspect
import math

import pytest
import torch

import formerlab.attention.base as base
from formerlab import attention
from formerlab.attention.base import OPTION_RULES
from formerlab.linalg import numerics

BAD_INT = [-1, 0.5, "3", True, None]
BAD_FLOAT = [-1.0, 0, "x", math.nan, math.inf, True]


def numeric_options(name):
    """(option, accepts None) for the kernel's constructor options that have a rule."""
    sig = inspect.signature(attention.KERNELS.entry(name).factory)
    return [
        (p.name, p.default is None or "None" in str(p.annotation))
        for p in sig.parameters.values()
        if p.name in OPTION_RULES
    ]


def kernel_option_cases():
    for name in attention.available():
        for option, nullable in numeric_options(name):
            kind, minimum = OPTION_RULES[option]
            bad = BAD_FLOAT if kind == "float" else list(BAD_INT)
            if kind == "int" and minimum is None:
                bad = [0.5, "3", True]
            if kind == "int" and minimum is not None and minimum > 0:
                bad = [minimum - 1, *bad]
            for value in bad:
                if value is None and nullable:
                    continue  # None is this option's "not set"
                yield pytest.param(name, option, value, id=f"{name}-{option}-{value!r}")


@pytest.mark.parametrize(("name", "option", "value"), list(kernel_option_cases()))
def test_bad_option_value_is_rejected_naming_kernel_option_and_value(name, option, value):
    pattern = rf"attention kernel '{name}': {option}={value!r} is not allowed; expected"
    with pytest.raises(ValueError, match=pattern.replace("(", r"\(").replace(")", r"\)")):
        attention.build(name, **{option: value})


def test_every_numeric_constructor_option_has_a_rule():
    """A new numeric option must get a rule (or it would go unchecked)."""
    for name in attention.available():
        sig = inspect.signature(attention.KERNELS.entry(name).factory)
        for p in sig.parameters.values():
            default = p.default
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                assert p.name in OPTION_RULES, f"{name}.{p.name} has no validation rule"


def test_softmax_scale_from_the_issue():
    with pytest.raises(ValueError, match=r"'softmax': scale=-1\.0 is not allowed"):
        attention.build("softmax", scale=-1.0)
    with pytest.raises(ValueError, match=r"'softmax': scale='x' is not allowed"):
        attention.build("softmax", scale="x")
    # a valid scale still means what it says: logits times scale, against a float64 reference
    q, k, v = torch.randn(3, 1, 2, 5, 4, dtype=torch.float64)
    out = attention.build("softmax", scale=0.3)(q, k, v)
    want = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1) @ v
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", attention.available())
@pytest.mark.parametrize("flag", ["causal", "need_weights"])
@pytest.mark.parametrize("value", ["no", 1, torch.tensor(True), None])
def test_call_flags_must_be_bools(name, flag, value):
    q = torch.randn(1, 1, 4, 2)
    kernel = attention.build(name)
    with pytest.raises(ValueError, match=rf"{flag}=.* is not allowed; expected True or False"):
        kernel(q, q, q, **{flag: value})


def test_compute_dtype_has_one_definition():
    assert base.compute_dtype is numerics.compute_dtype
    assert attention.compute_dtype is numerics.compute_dtype


def test_every_registered_kernel_class_is_exported():
    exported = {getattr(attention, n) for n in attention.__all__}
    for name in attention.available():
        cls = type(attention.build(name))
        assert cls in exported, f"{cls.__name__} ({name!r}) is not in formerlab.attention.__all__"
        assert getattr(attention, cls.__name__) is cls
