"""The pure per-output scorer and the group variants (ddapo.core.scorer), without a model: one class per function."""
import math

import pytest
import torch

from ddapo.core.diagnostics import SampleDiagnostics
from ddapo.core.formulas import sequence_scores
from ddapo.core.scorer import (SharedOutput, Unweighted, WeightSettings, group_variant, score_output,
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
        blocked = score_output(m, [0], 4, 4, weights=weights, weight_block=Unweighted('multi_turn_completion', 'detail'))
        assert blocked.token_weights is None and blocked.unweighted.reason == 'multi_turn_completion'
        assert blocked.reward == scored.reward
        off = score_output(m, [0], 4, 4, weight_block=Unweighted('multi_turn_completion', 'detail'))
        assert off.token_weights is None and off.unweighted is None  # weights off: nothing is left out


class TestTokenWeightBlock:
    """Edge cases: one turn labelled, several turns, unlabelled generated tokens, a flat id list, no ids."""

    def test_cases(self):
        assert token_weight_block([[1, 2]], True) is None
        assert token_weight_block([1, 2], True) is None  # one flat turn
        assert token_weight_block(None, True) is None
        assert token_weight_block([[1], [2]], True).reason == 'multi_turn_completion'
        assert token_weight_block([[1]], False).reason == 'unlabelled_generated_tokens'


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
