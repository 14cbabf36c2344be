"""Generation paths the other files leave out: top_p filtering against hand-computed cases, a batch whose
sequences reach eos at different steps, and fp16/bf16 generation against fp32."""

from __future__ import annotations

import math

import pytest
import torch

import kvzoo
from kvzoo.cache import H2O, FullCache, ZSMerge
from kvzoo.generate import Sampling, sample_next


# --- top_p ---------------------------------------------------------------------------------------------------

def _frequencies(probs: list[float], draws: int, **sampling) -> torch.Tensor:  # noqa: ANN003
    logits = torch.tensor(probs).log()[None].expand(draws, -1)
    gen = torch.Generator().manual_seed(0)
    tokens = sample_next(logits, Sampling(temperature=sampling.pop("temperature", 1.0), **sampling), gen)
    return torch.bincount(tokens, minlength=len(probs)).float() / draws


@pytest.mark.parametrize("top_p, temperature, expected", [
    # p = (.5, .3, .15, .05). A token stays while the mass of the tokens before it is < top_p.
    (0.7, 1.0, [0.5 / 0.8, 0.3 / 0.8, 0, 0]),  # masses before: 0, .5, .8 -> keep tokens 0, 1
    (0.85, 1.0, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),  # .8 < .85 keeps token 2; .95 drops token 3
    (0.5, 1.0, [1, 0, 0, 0]),  # the mass before token 1 is exactly .5: dropped; the top token always stays
    # temperature 2 first: p^(1/2) normalised = (.379, .294, .208, .120); masses before: 0, .379, .673
    (0.6, 2.0, [0.7071 / 1.2548, 0.5477 / 1.2548, 0, 0]),
])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, temperature, expected):
    """4000 draws: dropped tokens never appear, kept ones at their renormalised probability (5 binomial
    standard deviations, <= 0.04)."""
    freq = _frequencies([0.5, 0.3, 0.15, 0.05], 4000, top_p=top_p, temperature=temperature)
    for token, (f, e) in enumerate(zip(freq.tolist(), expected)):
        if e == 0:
            assert f == 0, f"token {token} should be filtered out, drawn {f:.3f}"
        else:
            assert abs(f - e) <= 5 * math.sqrt(e * (1 - e) / 4000) + 1e-9, f"token {token}: {f:.3f} vs {e:.3f}"


# --- eos at different steps ----------------------------------------------------------------------------------

def test_batch_sequences_finish_at_their_own_eos(tiny_checkpoint):
    """Two prompts, eos ids chosen from their own greedy continuations (without eos) so that sequence 0 stops
    at step i0 and sequence 1 at a later step i1: each gets exactly its tokens before its eos, finish reason
    "eos", and the other sequence is not disturbed (with a compressing method too)."""
    model = kvzoo.load(tiny_checkpoint("llama-gqa")[1])
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (14, 9)]
        free = model.generate_ids(prompts, max_new_tokens=10, eos_token_ids=[], compression=H2O(budget=8)).token_ids
        # Sequence b stops at step i_b when free[b][i_b] is an eos id that neither sequence emitted before.
        found = [(i0, i1) for i0 in range(1, 9) for i1 in range(i0 + 1, 10)
                 if free[0][i0] != free[1][i1]
                 and not {free[0][i0], free[1][i1]} & set(free[0][:i0] + free[1][:i1])]
        if found:
            i0, i1 = found[0]
            picks = [free[0][i0], free[1][i1]]
            break
    else:
        pytest.fail("no prompt pair with distinct eos steps found")
    out = model.generate_ids(prompts, max_new_tokens=10, eos_token_ids=picks, compression=H2O(budget=8))
    assert out.token_ids == [free[0][:i0], free[1][:i1]]
    assert out.finish_reasons == ["eos", "eos"]


# --- half precision ------------------------------------------------------------------------------------------

def _teacher_forced(model, method, prompt: list[int], tokens: list[int]) -> torch.Tensor:  # noqa: ANN001
    """fp32 logits [steps + 1, V] after the prompt and after each forced token, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    cache = method.make_cache(model.config, [len(prompt)], len(tokens), dtype, "cpu")
    with torch.inference_mode():
        out = [model(torch.tensor([prompt]), cache=cache, last_only=True)[0, -1].float()]
        for i, t in enumerate(tokens):
            pos = torch.tensor([[len(prompt) + i]])
            out.append(model(torch.tensor([[t]]), pos, cache=cache, decode=True)[0, -1].float())
    return torch.stack(out)


@pytest.mark.parametrize("dtype, eps", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)])
# ZSMerge without pooling: max-pooling ties are broken by each token's own score, and two own scores within
# bf16's precision of each other may order differently than in fp32 — a different (equally valid) decision,
# not a numerical error, which this test is about (measured: one layer keeps another token, logits move 0.07).
@pytest.mark.parametrize("method", [FullCache(), ZSMerge(budget=12, kernel_size=1), H2O(budget=12)],
                         ids=lambda m: type(m).__name__)
def test_half_precision_generation_tracks_fp32(tiny_checkpoint, dtype, eps, method):
    """The whole model and its cache in bf16/fp16: every teacher-forced step's logits stay within 2 machine
    epsilons of the dtype (bf16 2^-7, fp16 2^-10) of fp32's. The tiny model's logits are of order 1 (max
    ~0.9) and each of its two layers rounds activations once per op, so errors of about one epsilon are
    expected (measured: bf16 0.006, fp16 0.0009); a wrong-dtype path (fp32 attention mixed with half
    values, a cache cast back and forth) shows up as more. generate_ids runs in that dtype end to end."""
    path = tiny_checkpoint("llama-gqa")[1]
    prompt, tokens = [(7 * i + 3) % 128 for i in range(40)], list(range(60, 76))
    reference = _teacher_forced(kvzoo.load(path), method, prompt, tokens)
    half = kvzoo.load(path, dtype=dtype)
    got = _teacher_forced(half, method, prompt, tokens)
    err = (got - reference).abs().max().item()
    assert err <= 2 * eps * max(1.0, reference.abs().max().item()), f"{dtype}: max logit error {err}"
    out = half.generate_ids([prompt, prompt[:25]], max_new_tokens=6, eos_token_ids=[], compression=method)
    assert all(len(t) == 6 for t in out.token_ids)
    assert all(layer.k.dtype == dtype and layer.v.dtype == dtype for layer in out.cache.layers)
