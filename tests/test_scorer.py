"""The pure per-output scorer and the group variants (ddapo.core.scorer), without a model: one class per function."""
import math

import pytest
import torch

from ddapo.core.diagnostics import SampleDiagnostics
from ddapo.core.formulas import sequence_scores
from ddapo.core.scorer import (RowKeys, SharedOutput, Unweighted, WeightSettings, group_variant, score_output,
                               token_weight_block)


def masses(*per_layer):
    """``[L, |o|, 2]`` from per-layer lists of ``(text, vision)`` per token."""
    return torch.tensor(per_layer, dtype=torch.float32)


class TestScoreOutput:
    """Edge cases: only the layers Lambda are read, every not-applicable reason of the scorer itself (non-finite,
    only special tokens) and of `sequence_scores` (no vision keys), token weights on / blocked / off."""

    def test_reads_only_lambda(self):
        both = masses([[0.6, 0.2]], [[0.2, 0.6]])  # layer 0: m^T = 0.75, layer 1: m^T = 0.25
        assert score_output(both, [1], 10, 10).diagnostics.scores.tdr == pytest.approx(1 / 3)
        assert score_output(both, [0, 1], 10, 10).diagnostics.scores.tdr == pytest.approx(1.0)
        assert score_output(both, [0, 1], 10, 10).diagnostics.segment_M_vis['all'] == pytest.approx(0.5)

    def test_non_finite(self):
        scored = score_output(masses([[math.inf, 0.2]]), [0], 10, 10)
        assert scored.reward is None and scored.diagnostics.reason == 'non_finite_attention'
        assert 'fp16' in scored.detail

    def test_only_special_tokens(self):
        scored = score_output(masses([[0.6, 0.2]]), [0], 10, 10, generated=[7], special_ids={7, 8})
        assert scored.diagnostics.reason == 'only_special_tokens' and '[7]' in scored.detail
        assert score_output(masses([[0.6, 0.2]]), [0], 10, 10, generated=[7, 1], special_ids={7}).reward is not None

    def test_no_vision_keys(self):
        assert score_output(masses([[0.6, 0.0]]), [0], 10, 0).diagnostics.reason == 'no_vision_keys'

    def test_token_weights(self):
        m = masses([[0.5, 0.5], [0.75, 0.25], [0.9, 0.1]])  # one layer, three tokens: m^T = 0.5, 0.75, 0.9
        weights = WeightSettings((0.2, 3.0), 0.0)
        scored = score_output(m, [0], 4, 4, weights=weights)
        assert scored.token_weights == pytest.approx([1.0, 1.5, 0.5])  # token_weights' worked example
        assert scored.diagnostics.token_weights.count == 3 and scored.unweighted is None
        blocked = score_output(m, [0], 4, 4, weights=weights, weight_block=Unweighted('unlabelled_generated_tokens', 'detail'))
        assert blocked.token_weights is None and blocked.unweighted.reason == 'unlabelled_generated_tokens'
        assert blocked.reward == scored.reward
        off = score_output(m, [0], 4, 4, weight_block=Unweighted('unlabelled_generated_tokens', 'detail'))
        assert off.token_weights is None and off.unweighted is None  # weights off: nothing is left out


class TestTokenWeightBlock:
    """Edge cases: labelled generated tokens, unlabelled ones (a --loss_scale that masks some)."""

    def test_cases(self):
        assert token_weight_block(True) is None
        assert token_weight_block(False).reason == 'unlabelled_generated_tokens'


class TestTrajectory:
    """score_output with a trajectory's per-row counts (docs/notation.md, section 6), against the formulas written
    out here. Edge cases: a row that sees no vision key yet is left out of the reward and of M^V's split, and its
    successor keeps weight 1; the first row of each turn keeps weight 1; constant counts give the one-turn numbers;
    a trajectory no row of which sees a vision key is no_vision_keys."""

    # one layer, 4 rows: (text, vision) Eq. (1) sums; the environment's image takes 0.1 of row 3's and row 4's
    masses = torch.tensor([[[0.9, 0.0], [0.6, 0.2], [0.3, 0.3], [0.2, 0.6]]])
    env = torch.tensor([[0.0, 0.0, 0.1, 0.3]])
    text, vision = torch.tensor([5, 5, 7, 7]), torch.tensor([0, 4, 4, 8])

    def keys(self, follows=(False, True, False, True)):
        return RowKeys(self.text, self.vision, torch.tensor(follows), self.env)

    def test_reward(self):
        scored = score_output(self.masses, [0], 0, 0, trajectory=self.keys())
        m_text = [0.75, 0.5, 0.25]  # rows 2-4; row 1 sees no vision key
        rho_text = (0.75 / 5 + 0.5 / 7 + 0.25 / 7) / 3
        rho_vis = (0.25 / 4 + 0.5 / 4 + 0.75 / 8) / 3
        scores = scored.diagnostics.scores
        assert scores.rho_text == pytest.approx(rho_text) and scores.rho_vis == pytest.approx(rho_vis)
        assert scored.reward == pytest.approx(rho_vis / (rho_text + rho_vis))
        assert scores.M_text == pytest.approx(sum(m_text) / 3) and scores.num_tokens == 3
        assert (scores.num_text_keys, scores.num_vision_keys) == (7, 8)  # what the last row sees
        env_share = (0.0 + 0.1 / 0.6 + 0.3 / 0.8) / 3
        assert scored.diagnostics.M_V_env == pytest.approx(env_share)
        assert scored.diagnostics.M_V_prompt == pytest.approx(scores.M_vis - env_share)
        assert scored.diagnostics.segment_M_vis['all'] == pytest.approx(scores.M_vis)

    def test_weights(self):
        weights = score_output(self.masses, [0], 0, 0, weights=WeightSettings((0.0, 10.0), 0.0),
                               trajectory=self.keys()).token_weights
        # row 1 sees no image and chose nothing; row 3 starts a turn: only row 4 has a weight of its own (mean 1)
        assert weights == pytest.approx([1.0, 1.0, 1.0, 1.0])
        weights = score_output(self.masses, [0], 0, 0, weights=WeightSettings((0.0, 10.0), 0.0),
                               trajectory=self.keys((False, True, True, True))).token_weights
        r = [1 / ((0.75 * 4) / (0.25 * 5)), 1 / ((0.5 * 4) / (0.5 * 7))]  # 1 / TDR of rows 2 and 3 (Eq. 10)
        assert weights == pytest.approx([1.0, 1.0, 2 * r[0] / sum(r), 2 * r[1] / sum(r)])

    def test_constant_counts_are_one_turn(self):
        masses = self.masses[:, 1:]
        keys = RowKeys(torch.tensor([5, 5, 5]), torch.tensor([4, 4, 4]), torch.tensor([False, True, True]),
                       torch.zeros(1, 3))
        one_turn = score_output(masses, [0], 5, 4).diagnostics.scores
        trajectory = score_output(masses, [0], 5, 4, trajectory=keys).diagnostics.scores
        for name in ('rho_text', 'rho_vis', 'tdr', 'eta_text', 'eta_vis', 'reward_balance', 'M_text'):
            assert getattr(trajectory, name) == pytest.approx(getattr(one_turn, name), rel=1e-12), name

    def test_text_only(self):
        keys = RowKeys(torch.tensor([3, 4]), torch.tensor([0, 0]), torch.tensor([False, True]), torch.zeros(1, 2))
        scored = score_output(torch.tensor([[[0.5, 0.0], [0.7, 0.0]]]), [0], 0, 0, trajectory=keys)
        assert scored.reward is None and scored.diagnostics.reason == 'no_vision_keys'


def shared(rank, position, tdr, prompt='q', correct=True):
    """An output with ``TDR = tdr`` (``|T| = |V| = 1``: ``m^T = tdr / (1 + tdr)``), or not applicable (``None``)."""
    if tdr is None:
        return SharedOutput(rank, position, SampleDiagnostics(reason='no_vision_keys'), prompt, correct)
    scores = sequence_scores(torch.tensor([tdr / (1 + tdr)]), 1, 1)
    return SharedOutput(rank, position, SampleDiagnostics(scores=scores), prompt, correct)


class TestGroupVariant:
    """Edge cases: a group split across ranks is scored whole, this rank's outputs come back by position whatever
    the gather order, None stays None, two prompts are two groups, the gate zeroes wrong outputs."""

    def test_split_group_by_position(self):
        e = math.e
        everything = [shared(1, 0, e * e), shared(0, 1, e), shared(0, 0, 1.0)]  # gather order is not position order
        assert group_variant(everything, 0, 2, 1.0, False) == pytest.approx([0.294, 0.0], abs=1e-3)
        assert group_variant(everything, 1, 1, 1.0, False) == pytest.approx([-0.294], abs=1e-3)

    def test_none_and_groups(self):
        everything = [shared(0, 0, 1.0, 'a'), shared(0, 1, None, 'a'), shared(0, 2, 3.0, 'b')]
        assert group_variant(everything, 0, 3, 1.0, False) == [0.0, None, 0.0]  # one valid output per group

    def test_gated(self):
        e = math.e
        everything = [shared(0, 0, 1.0, correct=False), shared(0, 1, e), shared(0, 2, e * e)]
        ungated = group_variant(everything, 0, 3, 1.0, False)
        gated = group_variant(everything, 0, 3, 1.0, True)
        assert ungated[0] > 0 and gated[0] == 0.0 and gated[1:] == pytest.approx(ungated[1:])
