"""PPO formulas against numbers worked out by hand (in the comments) and a slow reference loop."""

import math

import pytest
import torch

from rlhf.ppo_math import (
    ClassicKLController,
    FixedKLController,
    LogKLController,
    apply_no_eos_penalty,
    classic_kl_coef_update,
    clip_scores,
    chunked_token_logprobs_and_entropy,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    grpo_advantages,
    kl_k1,
    kl_k3,
    kl_negative_beyond_noise,
    last_token_index,
    log_kl_coef_update,
    logprobs_and_entropy_from_logits,
    logprobs_and_entropy_grad,
    masked_mean,
    masked_sequence_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_moved_too_far,
    response_mask,
    rloo_advantages,
    score_dropped,
    softcap_logits,
    standard_error,
)

F64 = torch.float64
NAN = float("nan")


def t(*rows):
    return torch.tensor(rows, dtype=F64)


def approx(x, rel=1e-9, abs=1e-9):
    return pytest.approx(x, rel=rel, abs=abs)


# -- log-probs and entropy ---------------------------------------------------------------------

def test_logprobs_divide_logits_by_temperature():
    # logits [0, ln 3] -> probs [1/4, 3/4]; at T = 2, logits [0, ln 9] / 2 are the same [0, ln 3].
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(9)]]], dtype=F64)
    logp_t1, _ = logprobs_and_entropy_from_logits(logits[:, :1], torch.tensor([[1]]), temperature=1.0)
    logp_t2, _ = logprobs_and_entropy_from_logits(logits[:, 1:], torch.tensor([[0]]), temperature=2.0)
    assert logp_t1.item() == approx(math.log(0.75))
    assert logp_t2.item() == approx(math.log(0.25))


def test_entropy_of_uniform_is_log_vocab_at_any_temperature():
    logits = torch.zeros(2, 3, 7)
    for temperature in (0.5, 1.0, 3.0):
        _, entropy = logprobs_and_entropy_from_logits(logits, torch.zeros(2, 3, dtype=torch.long), temperature)
        assert torch.allclose(entropy, torch.full((2, 3), math.log(7)))


def test_entropy_hand_numbers_and_temperature():
    # probs [1/4, 3/4]: H = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335
    token = torch.tensor([[0]])
    _, h_t1 = logprobs_and_entropy_from_logits(torch.tensor([[[0.0, math.log(3)]]], dtype=F64), token, 1.0)
    _, h_t2 = logprobs_and_entropy_from_logits(torch.tensor([[[0.0, math.log(9)]]], dtype=F64), token, 2.0)
    assert h_t1.item() == approx(0.5623351446, rel=1e-8)
    assert h_t2.item() == approx(0.5623351446, rel=1e-8)


def test_softcap_hand_numbers():
    # cap 2: 2 tanh(2 / 2) = 2 * 0.7615942 = 1.5231884; 0 stays 0; -60 -> -2 tanh(30) ~ -2
    capped = softcap_logits(torch.tensor([2.0, 0.0, -60.0], dtype=F64), 2.0)
    assert capped.tolist() == approx([1.5231883119, 0.0, -2.0], rel=1e-9)


def test_logprobs_and_entropy_grad_hand_numbers():
    # z = [0, ln 3], p = [1/4, 3/4], token 1: d log p / dz = onehot - p = [-1/4, 1/4].
    # E_p[z] = 0.75 ln 3 = 0.8239592; z - E_p[z] = [-0.8239592, 0.2746531]; dH/dz = -p (z - E_p[z])
    # = [0.2059898, -0.2059898]. With weights 1 (log-prob) and 2 (entropy): [0.1619796, -0.1619796];
    # at T = 2 (logits [0, 2 ln 3]) the same z, and d/dlogits = d/dz / 2.
    for temperature in (1.0, 2.0):
        logits = torch.tensor([[0.0, temperature * math.log(3)]], dtype=F64)
        tokens = torch.tensor([1])
        logp, entropy = logprobs_and_entropy_from_logits(logits, tokens, temperature)
        grad = logprobs_and_entropy_grad(logits, tokens, temperature, logp, entropy, t(1.0), t(2.0))
        assert grad[0].tolist() == approx([0.1619796 / temperature, -0.1619796 / temperature], rel=1e-6)


def unchunked_logprobs_and_entropy(hidden, lm_head, tokens, temperature, softcap=None):
    """The plain formulas on the full [B, T, V] logits: what the chunked function must equal."""
    logits = lm_head(hidden)
    if softcap:
        logits = softcap_logits(logits, softcap)
    return logprobs_and_entropy_from_logits(logits, tokens, temperature)


def head_and_batch(vocab=11, width=5, batch=3, length=5, bias=True, seed=0):
    """A linear LM head and hidden states in fp64, so that chunked and unchunked agree to rounding (1e-10):
    in fp32 the head's gradient sums rows in another order, which alone differs by ~1e-6."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(width, vocab, bias=bias, dtype=F64)
    hidden = (3 * torch.randn(batch, length, width, dtype=F64)).requires_grad_()
    return head, hidden, torch.randint(0, vocab, (batch, length))


def grads_of(outputs, inputs):
    """Gradients of a loss mixing both outputs (weights so neither cancels) w.r.t. `inputs`."""
    logp, entropy = outputs
    loss = (logp * torch.linspace(-1, 2, logp.numel(), dtype=F64).view_as(logp)).sum() + 0.3 * entropy.sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("chunk_size", [1, 4, 6, 100])  # of 15 positions: 15 chunks, 3 of 5, 8 + 7, one
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_chunked_logprobs_entropy_and_gradients_equal_unchunked(chunk_size, softcap):
    head, hidden, tokens = head_and_batch()
    params = [hidden, head.weight, head.bias]
    expected = unchunked_logprobs_and_entropy(hidden, head, tokens, 0.7, softcap)
    chunked = chunked_token_logprobs_and_entropy(hidden, head, tokens, 0.7, chunk_size, softcap=softcap)
    for ours, theirs in zip(chunked, expected):
        assert ours.shape == tokens.shape
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    for ours, theirs in zip(grads_of(chunked, params), grads_of(expected, params)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk_size, sizes", [(1, [1] * 15), (4, [5, 5, 5]), (6, [8, 7]), (8, [15]), (100, [15])])
def test_chunks_hold_chunk_size_to_twice_that_positions(chunk_size, sizes):
    """No small remainder chunk: 15 positions in chunks of 6 are 8 + 7, not 6 + 6 + 3."""
    head, hidden, tokens = head_and_batch()
    seen = []

    def recording_head(h):
        seen.append(h.shape[0])
        return head(h)

    with torch.no_grad():
        chunked_token_logprobs_and_entropy(hidden, recording_head, tokens, 1.0, chunk_size)
    assert seen == sizes


def test_softcap_changes_the_chunked_logprobs():
    """The soft-capping case above is not vacuous: capping at 1.5 moves these log-probs."""
    head, hidden, tokens = head_and_batch()
    with torch.no_grad():
        plain, _ = chunked_token_logprobs_and_entropy(hidden, head, tokens, 1.0, 4)
        capped, _ = chunked_token_logprobs_and_entropy(hidden, head, tokens, 1.0, 4, softcap=1.5)
    assert (plain - capped).abs().max() > 0.1


def test_chunked_gradients_reach_a_lora_wrapped_head_exactly():
    from peft import LoraConfig, get_peft_model

    head, hidden, tokens = head_and_batch(bias=False)
    model = get_peft_model(torch.nn.Sequential(head), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    lora = [p for p in model.parameters() if p.requires_grad]
    assert len(lora) == 2
    expected = unchunked_logprobs_and_entropy(hidden, model, tokens, 1.3, softcap=2.0)
    chunked = chunked_token_logprobs_and_entropy(hidden, model, tokens, 1.3, 5, softcap=2.0)
    for ours, theirs in zip(grads_of(chunked, lora + [hidden]), grads_of(expected, lora + [hidden])):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_chunked_backward_keeps_no_logits():
    """Autograd saves for backward less than one [B, T, V] tensor in all: each chunk's logits are recomputed
    in backward, not kept. The unchunked formulas (and chunks without checkpointing) save several."""
    vocab = 50
    head, hidden, tokens = head_and_batch(vocab=vocab, batch=4, length=8)

    def saved_elements(compute):
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            grads_of(compute(), [hidden])
        return sum(sizes)

    full_logits = tokens.numel() * vocab
    assert saved_elements(lambda: unchunked_logprobs_and_entropy(hidden, head, tokens, 1.0)) > 2 * full_logits
    assert saved_elements(lambda: chunked_token_logprobs_and_entropy(hidden, head, tokens, 1.0, 4)) < full_logits


def test_chunked_upcasts_half_precision_logits_to_fp32():
    head, hidden, tokens = head_and_batch()
    with torch.no_grad():
        logp, entropy = chunked_token_logprobs_and_entropy(hidden.bfloat16(), head.bfloat16(), tokens, 1.0, 5)
    assert logp.dtype == entropy.dtype == torch.float32


# -- masked statistics -------------------------------------------------------------------------

def test_masked_mean_var_ignore_pads_even_nan():
    x = t([NAN, 1.0, 2.0], [3.0, 4.0, float("inf")])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == approx(2.5)
    # unbiased: (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    assert masked_var(x, mask).item() == approx(5 / 3)
    assert masked_mean(x, mask, dim=1).tolist() == approx([1.5, 3.5])


def test_masked_var_of_a_single_token_is_zero():
    assert masked_var(t([7.0, NAN]), torch.tensor([[True, False]])).item() == 0.0


def test_masked_whiten_hand_numbers():
    # x = [1, 2, 3, 4]: mean 2.5, std sqrt(5/3) = 1.290994; pads -> 0
    x = t([1.0, 2.0, 99.0], [3.0, 4.0, NAN])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    whitened = masked_whiten(x, mask)
    expected = [[-1.161895, -0.387298, 0.0], [0.387298, 1.161895, 0.0]]
    assert torch.allclose(whitened, torch.tensor(expected, dtype=F64), atol=1e-6)
    kept_mean = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(kept_mean[mask], torch.tensor([1.338105, 2.112702, 2.887298, 3.661895], dtype=F64),
                          atol=1e-6)
    assert kept_mean[~mask].tolist() == [0.0, 0.0]


# -- KL estimators and rewards -----------------------------------------------------------------

def test_kl_k1_k3_hand_numbers():
    # p = 1/2, p_ref = 1/4: k1 = ln 2; r = 1/2, k3 = (1/2 - 1) - ln(1/2) = 0.193147
    logp, ref = torch.tensor([math.log(0.5)], dtype=F64), torch.tensor([math.log(0.25)], dtype=F64)
    assert kl_k1(logp, ref).item() == approx(math.log(2))
    assert kl_k3(logp, ref).item() == approx(0.1931471806)
    # swapped: k1 = -ln 2 (negative for one token); r = 2, k3 = 1 - ln 2 = 0.306853
    assert kl_k1(ref, logp).item() == approx(-math.log(2))
    assert kl_k3(ref, logp).item() == approx(0.3068528194)
    assert kl_k3(logp, logp).item() == 0.0


def test_standard_error_hand_numbers():
    # values 1, 2, 3, 6: mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, sem = sqrt(14/3) / 2
    assert standard_error(torch.tensor([1.0, 2.0, 3.0, 6.0])) == approx(math.sqrt(14 / 3) / 2, rel=1e-6)
    assert standard_error(torch.tensor([5.0])) == 0.0


def test_negative_kl_warns_only_beyond_noise():
    assert not kl_negative_beyond_noise(-0.05, 0.0)  # above the floor
    assert not kl_negative_beyond_noise(-0.2, 0.1)  # -0.2 + 3 * 0.1 = 0.1 >= 0: noise of a small batch
    assert kl_negative_beyond_noise(-0.5, 0.1)  # -0.5 + 0.3 = -0.2 < 0: the estimate is really negative
    assert kl_negative_beyond_noise(-0.2, 0.0)  # one response: no spread to excuse it


def test_kl_k3_is_never_negative():
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(64, 16, generator=gen) * 3, torch.randn(64, 16, generator=gen) * 3
    assert (kl_k3(logp, ref) >= 0).all()


def test_per_token_rewards_with_early_eos_and_left_padding():
    # row 0 stops early (last real token at index 2), row 1 is left-padded (first real token at 1)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    logp = t([0.1, -0.2, 0.3, 5.0], [9.0, 0.2, 0.0, 0.4])
    ref = torch.zeros_like(logp)
    rewards, kl = per_token_rewards(t(2.0, -1.0), logp, ref, mask, kl_coef=0.5)
    # -0.5 * k1 on real tokens; the score added at the last real token; pads 0
    assert torch.allclose(rewards, t([-0.05, 0.1, -0.15 + 2.0, 0.0], [0.0, -0.1, 0.0, -0.2 - 1.0]))
    assert torch.allclose(kl, t([0.1, -0.2, 0.3, 0.0], [0.0, 0.2, 0.0, 0.4]))


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 0]


def test_response_mask_first_eos_included_then_off():
    eos = 2
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert response_mask(tokens, eos).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    left_padded = torch.tensor([[0, 0, 5, 2, 9]])
    assert response_mask(left_padded, eos, pad_id=0).int().tolist() == [[0, 0, 1, 1, 0]]
    # pad == eos (common: generate pads with EOS): the first EOS still counts
    assert response_mask(tokens, eos, pad_id=eos).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    # several stop tokens: whichever comes first ends the response
    assert response_mask(torch.tensor([[5, 8, 2, 4]]), [2, 8]).int().tolist() == [[1, 1, 0, 0]]


def test_no_eos_penalty_replaces_score_and_zero_turns_it_off():
    scores, has_eos = t(0.5, 2.0, -0.3), torch.tensor([True, False, False])
    assert apply_no_eos_penalty(scores, has_eos, -1.0).tolist() == [0.5, -1.0, -1.0]
    assert apply_no_eos_penalty(scores, has_eos, 0.0).tolist() == scores.tolist()


# -- GAE ---------------------------------------------------------------------------------------

def test_gae_hand_worked_three_tokens():
    # gamma 0.9, lambda 0.5, rewards [0, 0, 1], values [0.5, 0.2, 0.4]
    # t=2: delta = 1 - 0.4 = 0.6; A = 0.6
    # t=1: delta = 0.9*0.4 - 0.2 = 0.16; A = 0.16 + 0.45*0.6 = 0.43
    # t=0: delta = 0.9*0.2 - 0.5 = -0.32; A = -0.32 + 0.45*0.43 = -0.1265
    advantages, returns = gae(t([0.0, 0.0, 1.0]), t([0.5, 0.2, 0.4]), torch.ones(1, 3, dtype=torch.bool), 0.9, 0.5)
    assert advantages[0].tolist() == approx([-0.1265, 0.43, 0.6])
    assert returns[0].tolist() == approx([0.3735, 0.63, 1.0])


def test_gae_skips_left_padding_and_tokens_after_eos():
    # the same three real tokens, with a left pad and a post-EOS token holding garbage
    rewards = t([NAN, 0.0, 0.0, 1.0, 7.0])
    values = t([NAN, 0.5, 0.2, 0.4, float("inf")])
    mask = torch.tensor([[0, 1, 1, 1, 0]], dtype=torch.bool)
    advantages, returns = gae(rewards, values, mask, 0.9, 0.5)
    assert advantages[0].tolist() == approx([0.0, -0.1265, 0.43, 0.6, 0.0])
    assert returns[0].tolist() == approx([0.0, 0.3735, 0.63, 1.0, 0.0])


def slow_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE, one row at a time over the list of its real tokens, in plain Python floats."""
    advantages = torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        real = [i for i in range(rewards.shape[1]) if mask[row, i]]
        running = 0.0
        for k in reversed(range(len(real))):
            i = real[k]
            next_value = values[row, real[k + 1]].item() if k + 1 < len(real) else 0.0
            delta = rewards[row, i].item() + gamma * next_value - values[row, i].item()
            running = delta + gamma * lam * running
            advantages[row, i] = running
    return advantages, torch.where(mask, advantages + values, torch.zeros_like(values))


def test_gae_matches_slow_reference_on_random_masked_data():
    gen = torch.Generator().manual_seed(1)
    batch, length = 6, 9
    rewards = torch.randn(batch, length, generator=gen, dtype=F64)
    values = torch.randn(batch, length, generator=gen, dtype=F64)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    starts = torch.randint(0, 3, (batch,), generator=gen)
    ends = torch.randint(4, length + 1, (batch,), generator=gen)
    for row in range(batch):
        mask[row, starts[row]:ends[row]] = True
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (0.99, 1.0)):
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        ref_advantages, ref_returns = slow_gae(rewards, values, mask, gamma, lam)
        assert torch.allclose(advantages, ref_advantages)
        assert torch.allclose(returns, ref_returns)


# -- clipped losses ----------------------------------------------------------------------------

def policy_loss_at(ratio, advantage, cliprange=0.25):
    """Loss, clipfrac, approx KL and d loss / d logp for one token with the given ratio."""
    logp = torch.tensor([[math.log(ratio)]], dtype=F64, requires_grad=True)
    old_logp = torch.zeros(1, 1, dtype=F64)
    loss, clipfrac, approx_kl = clipped_policy_loss(logp, old_logp, t([advantage]), torch.ones(1, 1, dtype=torch.bool),
                                                    cliprange)
    loss.backward()
    return loss.item(), clipfrac.item(), approx_kl.item(), logp.grad.item()


@pytest.mark.parametrize("ratio, advantage, loss, clipfrac, grad", [
    (1.25, 2.0, -2.5, 0.0, -2.5),   # at the upper edge: both terms -2.5, not clipped
    (1.5, 2.0, -2.5, 1.0, 0.0),     # beyond it with A > 0: clipped at -A(1+eps), no gradient
    (1.5, -2.0, 3.0, 0.0, 3.0),     # beyond it with A < 0: unclipped -A*ratio = 3 wins, gradient -A*ratio
    (0.75, -2.0, 1.5, 0.0, 1.5),    # at the lower edge: both terms 1.5
    (0.5, -2.0, 1.5, 1.0, 0.0),     # below it with A < 0: clipped at -A(1-eps) = 1.5, no gradient
    (0.5, 2.0, -1.0, 0.0, -1.0),    # below it with A > 0: unclipped -A*ratio = -1 wins
])
def test_clipped_policy_loss_at_and_beyond_the_edges(ratio, advantage, loss, clipfrac, grad):
    got_loss, got_clipfrac, _, got_grad = policy_loss_at(ratio, advantage)
    assert (got_loss, got_clipfrac, got_grad) == (approx(loss), clipfrac, approx(grad))


def test_clipped_policy_loss_approx_kl_is_k3_of_old_vs_new():
    # ratio 1.5: (1.5 - 1) - ln 1.5 = 0.094535
    assert policy_loss_at(1.5, 1.0)[2] == approx(0.0945348919)


def test_clipped_policy_loss_ignores_pads():
    logp = t([math.log(1.5), NAN], [0.0, float("inf")])
    mask = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    loss, clipfrac, approx_kl = clipped_policy_loss(logp, torch.zeros_like(logp), t([2.0, NAN], [1.0, 5.0]), mask, 0.25)
    # token 1: clipped -2.5; token 2: ratio 1, -1. mean -1.75; one of two clipped
    assert loss.item() == approx(-1.75)
    assert clipfrac.item() == 0.5
    assert approx_kl.item() == approx(0.0945348919 / 2)


def test_masked_sequence_mean_weighs_every_response_the_same():
    x = t([1.0, 3.0, NAN], [10.0, NAN, NAN], [NAN, NAN, NAN])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    # rows: mean(1, 3) = 2 and 10; the empty row is left out: (2 + 10) / 2 = 6 (token mean: 14 / 3)
    assert masked_sequence_mean(x, mask).item() == approx(6.0)


def test_clipped_policy_loss_per_sequence():
    logp = t([math.log(1.5), 0.0], [0.0, NAN])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, _, _ = clipped_policy_loss(logp, torch.zeros_like(logp), t([2.0, 2.0], [1.0, NAN]), mask, 0.25,
                                     per_sequence=True)
    # row 1: clipped -2.5 and ratio 1: -2, mean -2.25; row 2: -1. (-2.25 - 1) / 2 = -1.625 (per token: -5.5 / 3)
    assert loss.item() == approx(-1.625)


def test_rloo_advantages_use_the_other_samples_mean():
    # prompt 1: [1, 2, 3, 6]: baselines (2+3+6)/3 = 11/3, (1+3+6)/3 = 10/3, (1+2+6)/3 = 3, (1+2+3)/3 = 2
    # prompt 2: [0, 0]: both 0
    assert rloo_advantages(t([1.0, 2.0, 3.0, 6.0])).tolist() == [approx([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0])]
    assert rloo_advantages(t([0.0, 0.0], [5.0, -1.0])).tolist() == [[0.0, 0.0], [6.0, -6.0]]


def test_grpo_advantages_are_normalised_within_each_group():
    # [1, 2, 3, 6]: mean 3; deviations -2, -1, 0, 3; sample std sqrt(14 / 3) = 2.160247
    std = math.sqrt(14 / 3) + 1e-4
    assert grpo_advantages(t([1.0, 2.0, 3.0, 6.0])).tolist() == [approx([-2 / std, -1 / std, 0.0, 3 / std])]
    # all equal: nothing to learn, not a division by zero
    assert grpo_advantages(t([0.7, 0.7, 0.7])).tolist() == [approx([0.0, 0.0, 0.0])]


@pytest.mark.parametrize("value, ret, loss, clipfrac", [
    (2.0, 3.0, 1.125, 1.0),    # moved 1 > 0.5 towards R: clipped 1.5 -> (1.5-3)^2 = 2.25 wins; 0.5 * 2.25
    (2.0, 0.0, 2.0, 0.0),      # moved away from R: unclipped (2-0)^2 = 4 wins; 0.5 * 4
    (1.5, 3.0, 1.125, 0.0),    # exactly at the edge: both (1.5-3)^2 = 2.25
    (0.25, -1.0, 1.125, 1.0),  # moved 0.75 > 0.5 down towards R: clipped 0.5 -> (0.5+1)^2 = 2.25 wins
    (0.75, -1.0, 1.53125, 0.0),  # within the range: both (0.75+1)^2 = 3.0625; 0.5 * 3.0625
])
def test_clipped_value_loss_at_and_beyond_the_edges(value, ret, loss, clipfrac):
    got_loss, got_clipfrac = clipped_value_loss(t([value]), t([1.0]), t([ret]), torch.ones(1, 1, dtype=torch.bool), 0.5)
    assert got_loss.item() == approx(loss)
    assert got_clipfrac.item() == clipfrac


def test_clipped_value_loss_ignores_pads():
    mask = torch.tensor([[1, 0]], dtype=torch.bool)
    loss, clipfrac = clipped_value_loss(t([2.0, NAN]), t([1.0, 0.0]), t([3.0, float("inf")]), mask, 0.5)
    assert (loss.item(), clipfrac.item()) == (approx(1.125), 1.0)


def test_entropy_and_kl_means_ignore_pads():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = float("nan")  # a pad position full of garbage
    mask = torch.tensor([[True, False]])
    _, entropy = logprobs_and_entropy_from_logits(logits, torch.zeros(1, 2, dtype=torch.long), 1.0)
    assert masked_mean(entropy, mask).item() == approx(math.log(4), rel=1e-6)
    assert masked_mean(kl_k3(t([0.0, NAN]), t([0.0, 1.0])), mask).item() == 0.0


def test_explained_variance_hand_numbers():
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    returns = t([1.0, 2.0, 3.0, 4.0, NAN])
    assert explained_variance(returns, returns, mask).item() == approx(1.0)
    assert explained_variance(torch.zeros_like(returns), returns, mask).item() == approx(0.0)
    # residual [0, 0, 0, -1]: var 0.25; Var(R) = 5/3; 1 - 0.25 / (5/3) = 0.85
    assert explained_variance(t([1.0, 2.0, 3.0, 5.0, 0.0]), returns, mask).item() == approx(0.85)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask).item())


# -- KL controllers ----------------------------------------------------------------------------

def test_classic_kl_coef_update():
    # 9/6 - 1 = 0.5 -> clipped 0.2: 0.2 * (1 + 0.2 * 16 / 10000) = 0.200064
    assert classic_kl_coef_update(0.2, 9.0, target=6.0, n_samples=16, horizon=10000) == approx(0.200064)
    # 5.4/6 - 1 = -0.1: 0.2 * (1 - 0.1 * 100 / 10000) = 0.1998
    assert classic_kl_coef_update(0.2, 5.4, target=6.0, n_samples=100, horizon=10000) == approx(0.1998)
    # -1 -> clipped -0.2: 0.2 * (1 - 0.2 * 1000 / 10000) = 0.196
    assert classic_kl_coef_update(0.2, 0.0, target=6.0, n_samples=1000, horizon=10000) == approx(0.196)


def test_log_kl_coef_update():
    # 3/2 - 1 = 0.5: 0.1 * e^(0.2 * 0.5) = 0.1 * 1.105170918 = 0.1105170918
    assert log_kl_coef_update(0.1, 3.0, target=2.0, gain=0.2, lo=1e-3, hi=10.0) == approx(0.1105170918)
    # 10/2 - 1 = 4 -> clipped 1: 0.1 * e^0.2 = 0.1221402758
    assert log_kl_coef_update(0.1, 10.0, target=2.0, gain=0.2, lo=1e-3, hi=10.0) == approx(0.1221402758)
    # no KL: -1: 0.1 * e^-0.2 = 0.0818730753
    assert log_kl_coef_update(0.1, 0.0, target=2.0, gain=0.2, lo=1e-3, hi=10.0) == approx(0.0818730753)
    # at target: unchanged; bounds hold: 9.5 * e^0.2 = 11.6 -> 10; 0.0011 * e^-0.2 = 0.0009 -> 0.001
    assert log_kl_coef_update(0.1, 2.0, target=2.0, gain=0.2, lo=1e-3, hi=10.0) == 0.1
    assert log_kl_coef_update(9.5, 50.0, target=2.0, gain=0.2, lo=1e-3, hi=10.0) == 10.0
    assert log_kl_coef_update(0.0011, 0.0, target=2.0, gain=0.2, lo=1e-3, hi=10.0) == 1e-3


def test_kl_controllers_update_and_state_round_trip():
    log = LogKLController(0.1, target=2.0, gain=0.2, lo=1e-3, hi=10.0)
    log.update(10.0, n_samples=16)  # as in test_log_kl_coef_update, whatever the batch size
    assert log.value == approx(0.1221402758)
    assert LogKLController(50.0, target=2.0, gain=0.2, lo=1e-3, hi=10.0).value == 10.0  # init within bounds
    restored = LogKLController(0.05, target=2.0, gain=0.2, lo=1e-3, hi=10.0)
    restored.load_state_dict(log.state_dict())
    assert restored.value == log.value

    classic = ClassicKLController(0.2, target=6.0, horizon=100)
    classic.update(12.0, n_samples=10)
    assert classic.value == approx(0.2 * 1.02)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_samples=10)
    assert fixed.value == 0.05
    fixed.load_state_dict({"value": 0.1})
    assert fixed.state_dict() == {"value": 0.1}


# -- collapse guards ---------------------------------------------------------------------------

def test_policy_moved_too_far():
    assert policy_moved_too_far(0.06, limit=0.05)
    assert not policy_moved_too_far(0.05, limit=0.05)  # at the limit: still fine
    assert not policy_moved_too_far(9.0, limit=0.0)  # 0 = off


def test_clip_scores():
    scores, share = clip_scores(t(-4.0, -1.0, 0.5, 3.5), limit=3.0)
    assert scores.tolist() == [-3.0, -1.0, 0.5, 3.0] and share.item() == 0.5  # 2 of 4 cut
    scores, share = clip_scores(t(-40.0, 4.0), limit=0.0)
    assert scores.tolist() == [-40.0, 4.0] and share.item() == 0.0


def test_score_dropped():
    # previous 1.9 +- 0.8, now -1.3: a fall of 3.2 = 4 std > 1.5
    assert score_dropped(1.9, 0.8, -1.3, n_std=1.5)
    # a fall of 1.1 = 1.375 std: not beyond 1.5; a rise never warns; 0 = off
    assert not score_dropped(1.9, 0.8, 0.8, n_std=1.5)
    assert not score_dropped(-1.0, 0.8, 2.0, n_std=1.5)
    assert not score_dropped(1.9, 0.8, -1.3, n_std=0.0)
