"""Eq. (1)-(11) on synthetic attention with hand-computed answers (ddapo.core.formulas, ddapo.core.variants,
ddapo.core.token_weights)."""
import math

import pytest
import torch

from ddapo.core.formulas import (NotApplicable, balance_reward, check_applicable, head_average, layer_key_attention,
                                 layer_modality_masses, layer_set, sequence_scores, token_text_mass)
from ddapo.core.token_weights import gaussian_smooth, mean_one_clip, token_tdr, token_weights
from ddapo.core.variants import TDR_BOUND, gated_rewards, group_robust_rewards, log_tdr


def mask(size, positions):
    out = torch.zeros(size, dtype=torch.bool)
    out[list(positions)] = True
    return out


class TestHeadAverage:
    """Edge cases: heads averaged; bf16 input gives float32."""

    def test_two_heads(self):
        attention = torch.tensor([[[0.6, 0.4, 0.0]], [[0.2, 0.2, 0.6]]])  # [H=2, rows=1, S=3]
        assert torch.allclose(head_average(attention), torch.tensor([[0.4, 0.3, 0.3]]))

    def test_bf16_input_gives_float32(self):
        out = head_average(torch.full((2, 3, 4), 0.25, dtype=torch.bfloat16))
        assert out.dtype == torch.float32 and out.shape == (3, 4)


class TestLayerModalityMasses:
    """Edge cases: keys in neither set (special tokens) carry mass that is not counted; several rows."""

    def test_rows(self):
        head_mean = torch.full((3, 4), 0.25)
        masses = layer_modality_masses(head_mean, mask(4, [0]), mask(4, [2, 3]))
        assert torch.allclose(masses, torch.tensor([[0.25, 0.5]] * 3))


class TestLayerKeyAttention:
    """Edge cases (the worked example is a doctest): sums to 1 over the keys; a row with no mass on the keys is left
    out; no valid row at all gives zeros."""

    def test_row_without_key_mass_left_out(self):
        out = layer_key_attention(torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.6, 0.2]]), mask(3, [0]), mask(3, [1]))
        assert torch.allclose(out, torch.tensor([0.25, 0.75, 0.0])) and out.sum().item() == pytest.approx(1.0)

    def test_no_valid_row(self):
        out = layer_key_attention(torch.tensor([[0.0, 0.0, 1.0]]), mask(3, [0]), mask(3, [1]))
        assert torch.equal(out, torch.zeros(3))


class TestTokenTextMass:
    """Edge cases: Eq. (1) renormalisation; a layer with zero denominator is left out; no valid layer -> NaN."""

    def test_renormalisation_ignores_mass_outside_keys(self):
        # 0.3 text, 0.1 vision, the rest on special tokens: a = 0.75 whatever the rest is
        assert token_text_mass(torch.tensor([[[0.3, 0.1]]])).item() == pytest.approx(0.75)
        assert token_text_mass(torch.tensor([[[0.03, 0.01]]])).item() == pytest.approx(0.75)

    def test_zero_denominator_layer_left_out(self):
        layer_masses = torch.tensor([[[0.0, 0.0]], [[0.2, 0.6]]])
        assert token_text_mass(layer_masses).item() == pytest.approx(0.25)

    def test_token_without_valid_layer_is_nan(self):
        layer_masses = torch.tensor([[[0.0, 0.0], [0.5, 0.5]]])
        m_text = token_text_mass(layer_masses)
        assert math.isnan(m_text[0].item()) and m_text[1].item() == pytest.approx(0.5)


class TestSequenceScores:
    """Edge cases (the worked example is a doctest): Eq. (5)/(6) identities, length invariance, NaN tokens, M^V = 0
    and the undefined cases of notation section 4 (|V| = 0, |T| = 0, |o_i| = 0, no defined token)."""

    def test_identities(self):
        s = sequence_scores(torch.tensor([0.9, 0.35, 0.5]), num_text_keys=7, num_vision_keys=64)
        M_text = (0.9 + 0.35 + 0.5) / 3  # Eq. (5), from the inputs
        rho_text, rho_vis = M_text / 7, (1 - M_text) / 64  # Eq. (2)
        assert (s.M_text, s.M_vis) == pytest.approx((M_text, 1 - M_text))
        assert (s.rho_text, s.rho_vis) == pytest.approx((rho_text, rho_vis))
        assert s.tdr == pytest.approx(rho_text / rho_vis)  # Eq. (3)
        assert (s.eta_text, s.eta_vis) == pytest.approx((M_text / (7 / 71), (1 - M_text) / (64 / 71)))  # Eq. (6)
        assert s.reward_balance == pytest.approx(rho_vis / (rho_text + rho_vis))  # Eq. (7)

    def test_balance_is_one_half(self):
        s = sequence_scores(torch.tensor([0.25]), num_text_keys=10, num_vision_keys=30)  # 0.25/10 == 0.75/30
        assert s.tdr == pytest.approx(1.0) and s.reward_balance == pytest.approx(0.5)

    def test_length_invariance(self):
        short = sequence_scores(torch.tensor([0.8, 0.6]), 10, 30)
        long = sequence_scores(torch.tensor([0.8, 0.6] * 50), 10, 30)
        assert long.reward_balance == pytest.approx(short.reward_balance) and long.num_tokens == 100

    def test_nan_tokens_left_out(self):
        s = sequence_scores(torch.tensor([0.8, float('nan'), 0.6]), 10, 30)
        assert s.M_text == pytest.approx(0.7) and s.num_tokens == 2

    def test_no_vision_mass_gives_infinite_tdr_and_zero_reward(self):
        s = sequence_scores(torch.tensor([1.0, 1.0]), 10, 30)
        assert s.tdr == math.inf and s.reward_balance == 0.0

    def test_all_vision_mass_gives_reward_one(self):
        s = sequence_scores(torch.tensor([0.0]), 10, 30)
        assert s.tdr == 0.0 and s.reward_balance == 1.0

    @pytest.mark.parametrize('m_text, num_text, num_vision, reason', [
        (torch.tensor([0.5]), 10, 0, 'no_vision_keys'),
        (torch.tensor([0.5]), 0, 30, 'no_text_keys'),
        (torch.tensor([]), 10, 30, 'empty_completion'),
        (torch.tensor([float('nan')] * 3), 10, 30, 'no_prompt_attention'),
    ])
    def test_undefined_cases(self, m_text, num_text, num_vision, reason):
        with pytest.raises(NotApplicable) as error:
            sequence_scores(m_text, num_text, num_vision)
        assert error.value.reason == reason


class TestCheckApplicable:
    """Edge cases (the worked example is a doctest): |V| checked before |T|, one defined token among NaN is enough."""

    def test_order_and_defined(self):
        with pytest.raises(NotApplicable) as info:
            check_applicable(torch.tensor([]), 0, 0)
        assert info.value.reason == 'no_vision_keys'
        assert check_applicable(torch.tensor([math.nan, 0.3]), 2, 2) is None


class TestBalanceReward:
    """Edge cases (the worked example is a doctest): rho_vis = 0 gives 0, rho_text = 0 gives 1. (rho_text + rho_vis = 0
    cannot occur: M^T + M^V = 1, so one of the two densities is positive.)"""

    def test_zero_rho_vis(self):
        assert balance_reward(0.03, 0.0) == 0.0

    def test_zero_rho_text(self):
        assert balance_reward(0.0, 0.02) == 1.0


class TestLayerSet:
    """Edge cases: last:K with L >= K and L < K, all, thirds (docstring example), bad specs."""

    def test_last_k(self):
        assert layer_set(28, 'last:8') == list(range(20, 28))
        assert layer_set(4, 'last:8') == [0, 1, 2, 3]

    def test_thirds_and_all(self):
        assert layer_set(28, 'early') == list(range(0, 9))
        assert layer_set(28, 'middle') == list(range(9, 18))
        assert layer_set(28, 'late') == list(range(18, 28))
        assert layer_set(3, 'all') == [0, 1, 2]

    @pytest.mark.parametrize('spec', ['last:0', 'first:2', 'LATE'])
    def test_bad_spec(self, spec):
        with pytest.raises(ValueError):
            layer_set(28, spec)


class TestLogTdr:
    """Edge cases: finite value, TDR = inf and TDR = 0 clipped to finite bounds."""

    def test_cases(self):
        assert log_tdr(math.e) == pytest.approx(1.0)
        assert log_tdr(math.inf) == pytest.approx(math.log(1e6)) and log_tdr(0.0) == pytest.approx(-math.log(1e6))


class TestGroupRobustRewards:
    """Edge cases (the worked example is a doctest): sigma, groups kept apart, fewer than two valid outputs, MAD = 0,
    None stays None, order and group split across the list (as after a gather across ranks)."""

    def test_sigma(self):
        z = 1 / (1.4826 + 1e-6)
        assert group_robust_rewards([0, 1, 2], ['a'] * 3, sigma=2.0)[0] == pytest.approx(0.5 * math.tanh(z / 2))

    def test_groups_interleaved(self):
        out = group_robust_rewards([0, 5, 1, 6, 2, 9], ['a', 'b', 'a', 'b', 'a', 'b'])
        assert out[0::2] == pytest.approx([0.29396, 0.0, -0.29396], abs=1e-4)
        assert out[1] == pytest.approx(0.29396, abs=1e-4) and out[3] == 0.0 and out[5] < -0.4  # b: median 6, MAD 1

    def test_degenerate_groups(self):
        assert group_robust_rewards([1.0, None], ['a', 'a']) == [0.0, None]
        assert group_robust_rewards([1.0, 1.0, 1.0], ['a'] * 3) == [0.0, 0.0, 0.0]
        assert group_robust_rewards([5.0, 5.0, 9.0], ['a'] * 3) == [0.0, 0.0, 0.0]  # MAD = median(0, 0, 4) = 0
        assert group_robust_rewards([None, None], ['a', 'a']) == [None, None]

    def test_bounded(self):
        out = group_robust_rewards([-500.0, 0.0, 0.1, 0.2, 500.0], ['a'] * 5)  # median 0.1, MAD 0.1
        assert all(-0.5 <= r <= 0.5 for r in out) and out[0] > 0.4999 and out[4] < -0.4999 and out[2] == 0.0


class TestGatedRewards:
    """Edge cases (the worked example is a doctest): groups kept apart."""

    def test_groups(self):
        out = gated_rewards([0.2, -0.2, 0.4, -0.4], [True, True, True, False], ['a', 'a', 'b', 'b'])
        assert out == [0.2, -0.2, 0.0, 0.0]


class TestTokenTdr:
    """Edge cases (the worked example is a doctest): |T| != |V|, m^T = 0 and m^V = 0 clipped to the bound, NaN kept."""

    def test_key_counts(self):
        # Eq. (10): (m^T |V|) / (m^V |T|) = (0.5 * 30) / (0.5 * 10)
        assert token_tdr(torch.tensor([0.5]), 10, 30).item() == pytest.approx(3.0)

    def test_bounds_and_nan(self):
        out = token_tdr(torch.tensor([0.0, math.nan]), 5, 5)
        assert out[0].item() == pytest.approx(1 / TDR_BOUND) and math.isnan(out[1].item())


class TestGaussianSmooth:
    """Edge cases (the worked example is a doctest): sigma = 0 and one token unchanged, a constant stays constant (ends
    renormalised), undefined tokens take no weight, the kernel reaches 3 sigma."""

    def test_identity_cases(self):
        values = torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64)
        assert torch.equal(gaussian_smooth(values, 0.0), values)
        assert torch.equal(gaussian_smooth(values[:1], 2.0), values[:1])

    def test_constant_stays_constant(self):
        assert gaussian_smooth(torch.full((9,), 2.5), 1.5).tolist() == pytest.approx([2.5] * 9)

    def test_undefined_tokens_take_no_weight(self):
        values = torch.tensor([2.0, math.nan, 2.0, 2.0])
        out = gaussian_smooth(values, 1.0, defined=~torch.isnan(values))
        assert out.tolist() == pytest.approx([2.0] * 4)

    def test_reach(self):
        impulse = torch.zeros(11, dtype=torch.float64)
        impulse[5] = 1.0
        out = gaussian_smooth(impulse, 1.0)
        assert out[2] > 0 and out[8] > 0 and out[1] == 0 and out[9] == 0  # |d| <= ceil(3 sigma) = 3


class TestMeanOneClip:
    """Edge cases (the worked example, a doctest: clipping moves the free tokens so the mean stays 1): already
    inside the bounds (plain normalisation), equal values, bounds (1, 1) give exactly 1, a huge outlier, bad bounds."""

    def test_inside_bounds_is_plain_normalisation(self):
        assert mean_one_clip(torch.tensor([1.0, 2.0, 3.0]), 0.2, 3.0).tolist() == pytest.approx([0.5, 1.0, 1.5])

    def test_equal_values(self):
        assert mean_one_clip(torch.tensor([0.3] * 4), 0.2, 3.0).tolist() == pytest.approx([1.0] * 4)

    def test_unit_bounds_exact(self):
        assert mean_one_clip(torch.tensor([0.1, 5.0, 2.0]), 1.0, 1.0).tolist() == [1.0, 1.0, 1.0]

    def test_outlier(self):
        out = mean_one_clip(torch.tensor([1e6, 1.0, 1.0, 1.0]), 0.2, 3.0)
        assert out.tolist() == pytest.approx([3.0, 1 / 3, 1 / 3, 1 / 3])
        assert out.mean().item() == pytest.approx(1.0, abs=1e-12)

    def test_random_mean_one(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(20):
            values = torch.exp(4 * torch.randn(50, generator=generator, dtype=torch.float64))
            out = mean_one_clip(values, 0.2, 3.0)
            assert out.mean().item() == pytest.approx(1.0, abs=1e-9)
            assert out.min() >= 0.2 and out.max() <= 3.0
            assert torch.all(torch.diff(out[torch.argsort(values)]) >= -1e-12)  # order kept

    @pytest.mark.parametrize('low, high', [(1.2, 3.0), (0.2, 0.9), (-0.1, 2.0)])
    def test_bad_bounds(self, low, high):
        with pytest.raises(ValueError, match='0 <= low <= 1 <= high'):
            mean_one_clip(torch.tensor([1.0, 2.0]), low, high)


class TestTokenWeights:
    """Edge cases (the worked example, a doctest: token t from row t-1, the first token 1): one token, |T| != |V|
    cancels, a lower ratio weighs more, undefined rows weigh 1, unit bounds give exactly 1, smoothing, the cases
    where the reward is undefined."""

    def test_single_token(self):
        assert token_weights(torch.tensor([0.3]), 4, 9).tolist() == [1.0]

    def test_key_counts_cancel(self):
        m_text = torch.tensor([0.2, 0.5, 0.75, 0.6])
        assert token_weights(m_text, 10, 30).tolist() == pytest.approx(token_weights(m_text, 7, 7).tolist())

    def test_vision_leaning_rows_weigh_more(self):
        w = token_weights(torch.tensor([0.9, 0.2, 0.6, 0.4, 0.0]), 5, 5)
        assert w[2] > w[4] > w[3] > w[1]  # chosen by rows with m^T 0.2 < 0.4 < 0.6 < 0.9
        assert w[1:].mean().item() == pytest.approx(1.0)

    def test_undefined_rows_weigh_one(self):
        w = token_weights(torch.tensor([0.5, math.nan, 0.75, 0.1]), 4, 4)
        assert w[0] == 1.0 and w[2] == 1.0
        assert w[[1, 3]].tolist() == pytest.approx([1.5, 0.5])

    def test_unit_bounds_exact(self):
        assert token_weights(torch.tensor([0.1, 0.9, 0.5]), 3, 8, clip=(1.0, 1.0)).tolist() == [1.0, 1.0, 1.0]

    def test_smoothing(self):
        m_text = torch.tensor([0.5, 0.9, 0.1, 0.9, 0.9])
        sharp, smooth = token_weights(m_text, 4, 4), token_weights(m_text, 4, 4, sigma=1.0)
        assert smooth[1:].mean().item() == pytest.approx(1.0)
        assert smooth[1:].std() < sharp[1:].std()

    @pytest.mark.parametrize('m_text, num_text, num_vision, reason', [
        ([0.5], 4, 0, 'no_vision_keys'), ([0.5], 0, 4, 'no_text_keys'), ([], 4, 4, 'empty_completion'),
        ([math.nan, math.nan], 4, 4, 'no_prompt_attention')])
    def test_undefined_cases(self, m_text, num_text, num_vision, reason):
        with pytest.raises(NotApplicable) as info:
            token_weights(torch.tensor(m_text, dtype=torch.float32), num_text, num_vision)
        assert info.value.reason == reason
