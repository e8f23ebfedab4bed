"""Cached generation does O(1) work per new token: after the prompt, every mixer and every
attention kernel is called on exactly one new position per token, whatever the length so
far. (Comparing cached with uncached tokens cannot catch a cache that silently recomputes:
both paths then agree.) The recompute path is counted too, so the counter is known to see
a recompute when there is one."""

import pytest
import torch

from formerlab import attention, mixers
from formerlab.attention.base import AttentionKernel
from formerlab.mixers.params import takes_kernel
from formerlab.models import DecoderLM

VOCAB = 11
PROMPT, TOKENS = 5, 24


def cases():
    out = [("attention", {"kernel": k}) for k in attention.available(causal=True)]
    for name in mixers.available(causal=True):
        if name != "attention":
            out.append((name, {"kernel": "softmax"} if takes_kernel(name) else {}))
    return out


CASES = cases()
IDS = [f"{m}-{o.get('kernel', '')}" for m, o in CASES]


def count_positions(model):
    """Wrap ``forward`` / ``step`` of every mixer and attention kernel of ``model`` (on the
    instances): each call appends (what, how many positions it was given) to the list."""
    calls = []

    def wrap(module, method, what, seq_dim):
        original = getattr(module, method)

        def counted(x, *args, **kwargs):
            calls.append((f"{what}.{method}", x.shape[seq_dim]))
            return original(x, *args, **kwargs)

        setattr(module, method, counted)

    for module in model.modules():
        if isinstance(module, AttentionKernel):  # q is (B, H, N, D)
            wrap(module, "forward", "kernel", -2)
            wrap(module, "step", "kernel", -2)
    for mixer in model.mixers():  # x is (B, N, C)
        wrap(mixer, "forward", "mixer", 1)
        wrap(mixer, "step", "mixer", 1)
    return calls


def decoder(mixer, options, positions, max_len=64):
    torch.manual_seed(0)
    model = DecoderLM(VOCAB, dim=16, depth=2, heads=2, max_len=max_len, mixer=mixer,
                      mixer_options=options, positions=positions)
    return model.double().eval()


def per_token(calls, what):
    """Positions given to ``what`` (a prefix: "mixer" / "kernel"), in call order."""
    return [n for name, n in calls if name.startswith(what)]


@pytest.mark.parametrize("positions", ["learned", "rope", "none"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_cached_token_computes_one_position(case, positions):
    mixer, options = case
    if positions == "rope" and not takes_kernel(mixer):
        pytest.skip("a mixer without attention has no rotary option")
    model = decoder(mixer, options, positions)  # max_len 64 > 5 + 24: the cache is never rebuilt
    calls = count_positions(model)
    prompt = torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    model.generate(prompt, TOKENS, top_k=1)
    depth = len(model.mixers())
    got = per_token(calls, "mixer")
    # each layer's mixer: the prompt once, then one position for each later token
    assert sorted(got) == sorted([PROMPT] * depth + [1] * (TOKENS - 1) * depth), got
    assert sum(got) == depth * (PROMPT + TOKENS - 1)  # linear in the tokens, not quadratic
    kernels = per_token(calls, "kernel")
    if any(isinstance(m, AttentionKernel) for m in model.modules()):
        assert kernels, "no kernel call was seen"
        # a kernel may be called once per mixer call (its own step), never on more positions
        assert max(kernels[depth:]) == 1, kernels
        assert sum(kernels) <= depth * (PROMPT + TOKENS - 1), kernels


def test_the_counter_sees_the_recompute_path():
    model = decoder("attention", {"kernel": "causal_nystrom"}, "rope")
    calls = count_positions(model)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    model.generate(prompt, TOKENS, top_k=1, use_cache=False)
    got = per_token(calls, "mixer")
    assert sum(got) == 2 * sum(range(PROMPT, PROMPT + TOKENS))  # every token redoes the context


def test_learned_positions_rebuild_the_window_past_max_len_and_only_then():
    """The documented exception: learned absolute positions shift with the sliding window,
    so once the context exceeds ``max_len`` each token recomputes the window (max_len
    positions) — and not before."""
    max_len = 8
    model = decoder("attention", {"kernel": "causal_nystrom"}, "learned", max_len=max_len)
    calls = count_positions(model)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    model.generate(prompt, TOKENS, top_k=1)
    got = per_token(calls, "mixer")[::2]  # the first layer's mixer
    within = max_len - PROMPT  # tokens fed before the window first slides
    assert got[: within + 1] == [PROMPT] + [1] * within
    assert got[within + 1 :] == [max_len] * (TOKENS - 1 - within)
