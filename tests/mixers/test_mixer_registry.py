"""The mixer registry: classes registered directly, exported, and option typos named
with both the mixer's and the kernel's options."""

import inspect

import pytest
import torch

from formerlab import mixers


def test_public_mixer_classes_are_exported_and_registered_directly():
    for name, cls in [
        ("attention", mixers.SelfAttention),
        ("metric", mixers.MetricAttention),
        ("quadratic", mixers.QuadraticAttention),
        ("pooling", mixers.Pooling),
    ]:
        assert cls.__name__ in mixers.__all__
        # the class is the factory: options and defaults cannot drift from the constructor
        assert mixers.MIXERS.entry(name).factory is cls
        built = mixers.build(name, dim=16, heads=2)
        assert type(built) is cls


@pytest.mark.parametrize("name", ["attention", "metric", "quadratic"])
def test_typo_lists_mixer_and_kernel_options(name):
    own = [
        p for p in inspect.signature(mixers.MIXERS.entry(name).factory).parameters
        if p not in ("dim", "kernel_options")
    ]
    with pytest.raises(ValueError) as caught:
        mixers.build(name, dim=16, heads=2, kernel="nystrom", kernal="softmax")
    text = str(caught.value)
    assert f"unknown option(s) ['kernal'] for token mixer {name!r} with kernel 'nystrom'" in text
    assert f"mixer options: {own}" in text
    assert "kernel options: ['num_landmarks'," in text


def test_kernel_options_still_reach_the_kernel():
    mix = mixers.build("attention", dim=16, heads=2, kernel="nystrom", num_landmarks=3)
    assert mix.kernel.num_landmarks == 3


def test_pooling_ignores_heads_but_not_typos():
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    pool = mixers.build("pooling", dim=4, heads=7, pool_size=3)
    want = (torch.nn.functional.avg_pool1d(
        torch.nn.functional.pad(x.transpose(1, 2), (1, 1)), 3, stride=1, count_include_pad=False
    ).transpose(1, 2)) - x
    # interior tokens: a plain 3-window mean minus the token
    torch.testing.assert_close(pool(x)[:, 1:-1], want[:, 1:-1])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['pool'\] for token mixer 'pooling'"):
        mixers.build("pooling", dim=4, heads=2, pool=3)
