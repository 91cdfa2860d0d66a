"""The configuration matrix, in process: every family x every path x every micro-batch layout, against the suite's
naive reference (tests/naive_reference.py: eager ``output_attentions``, its own key sets; fp32, 1e-5).

- Families: Qwen2-VL, Qwen2.5-VL, Qwen3.5 (hybrid), InternVL3 (dense), InternVL3.5 with a Qwen3-MoE language model,
  GLM-4.1V, GLM-4.5V (MoE), Gemma 3 (sliding-window layers) - each a tiny random build (conftest).
- Paths: ``old_logps`` (the capture inside the trainer's old log-prob forward, on ms-swift's own micro-batch) and the
  reward's own forwards under ``DDAPO_ATTENTION=shared``, ``rows`` and ``eager``.
- Layouts of the trainer's micro-batch (``old_logps`` only: the reward's own forwards run one sequence, or their own
  pack): ``--padding_side right`` and ``left``. The packed layout (``--padding_free``) needs flash attention's varlen
  kernel, which CPU transformers has not: it is covered by tests/test_old_logps.py::TestPackedRows (the eager rows of
  a packed row) and stays on the GPU check (docs/reward.md).
- Every case has the shapes real runs have: a group of two outputs sharing a prompt (the shared path packs them),
  completions of different lengths (padding), a row with a system message and rows without, and a text-only row
  (None, counted). The coverage is the full product: 8 families x (2 layouts + 3 own paths) = 40 cases.

The self-check is off here: these cases test the paths themselves (with it on, a disagreeing path would return
eager's numbers; tests/test_self_check.py tests the check). Each case also asserts the path read every row itself
(no fallback to another path).
"""
import pytest
import torch

import naive_reference
from conftest import make_policy
from test_old_logps import capture_for, micro_batch, old_logps_logits, trainer_attention, trainer_layout
from test_reward import reward_kwargs, rows_of

FAMILIES = ['qwen2_vl', 'qwen2_5_vl', 'qwen3_5', 'internvl', 'internvl_qwen3_moe', 'glm4v', 'glm4v_moe',
            'gemma3_vision']
TRAINER_ATTENTION = {'gemma3_vision': 'eager'}  # the implementation ms-swift loads each with (sdpa otherwise)
COMPLETIONS = ['The answer is red', 'It is a square, I think so', 'blue', 'Yellow']
SYSTEM = 'Answer in one word.'


@pytest.fixture(scope='module', params=FAMILIES)
def family(request, tiny_model_dir, tmp_path_factory):
    """A family's policy, its rows and their naive rewards (computed once per family)."""
    policy = make_policy(tiny_model_dir(request.param), request.param, str(tmp_path_factory.mktemp('output')))
    policy.model_type = request.param
    columns = reward_kwargs(policy, COMPLETIONS, text_only_rows=(3,))
    # outputs 0 and 1 share the prompt (and its image); output 2 has a system message; output 3 is text-only
    columns['messages'][1] = [columns['messages'][0][0], columns['messages'][1][1]]
    columns['images'][1] = columns['images'][0]
    columns['messages'][2] = [{'role': 'system', 'content': SYSTEM}] + columns['messages'][2]
    columns['prompt_id'] = ['p0', 'p0', 'p1', 'p2']
    columns['request_id'] = ['r0', 'r1', 'r2', 'r3']
    naive = [naive_reference.balance_reward(policy, row) for row in rows_of(columns)[:3]]
    assert abs(naive[0] - naive[1]) > 1e-4  # the group's two outputs differ: a swapped or shifted read shows
    yield policy, columns, naive
    policy.template.remove_post_encode_hook()


def check(rewards, naive, reward):
    assert rewards[3] is None and reward.not_applicable == {'no_vision_keys': 1}
    assert rewards[:3] == pytest.approx(naive, abs=1e-5), (rewards, naive)


class TestOldLogps:
    """The capture inside the old log-prob forward on ms-swift's micro-batch (right and left padding), the trainer on
    its implementation: the logits are bit for bit those without the capture, every row is captured (no fallback), and
    each reward equals naive."""

    @pytest.mark.parametrize('layout', ['right', 'left'])
    def test_layout(self, family, layout):
        from ddapo.core.config import DDAPOConfig
        policy, columns, naive = family
        samples, model_inputs = micro_batch(policy, columns, layout)
        widths = {len(s.encoded['input_ids']) for s in samples}
        assert len(widths) > 1  # the micro-batch is padded
        capture, reward = capture_for(policy, DDAPOConfig(self_check=False))
        with trainer_layout(policy, layout), trainer_attention(policy,
                                                                TRAINER_ATTENTION.get(policy.model_type, 'sdpa')):
            plain = old_logps_logits(policy, dict(model_inputs))
            with capture(samples, model_inputs):
                captured = old_logps_logits(policy, dict(model_inputs))
        assert torch.equal(plain, captured)
        rewards = reward(COMPLETIONS, **columns)
        assert reward.uncaptured == 0 and sum(capture.fallbacks.values()) == 0
        assert reward.scheduler.last_forwards == 0
        check(rewards, naive, reward)


class TestOwnPaths:
    """The reward's own forwards under each DDAPO_ATTENTION: shared packs the group's two outputs into one forward
    (not on the hybrid Qwen3.5 and Gemma 3, whose linear or sliding-window layers would see across outputs: one
    output per forward there, which is why Gemma 3 was exact while InternVL's packs were not), rows and eager run one
    sequence per output."""

    @pytest.mark.parametrize('attention', ['shared', 'rows', 'eager'])
    def test_path(self, family, attention):
        from ddapo.core.config import DDAPOConfig
        from ddapo.reward import DDAPOAttentionORM
        policy, columns, naive = family
        reward = DDAPOAttentionORM(config=DDAPOConfig(forward='own', attention=attention, self_check=False))
        rewards = reward(COMPLETIONS, **columns)
        packs = attention == 'shared' and not reward.swift.spec.hybrid
        assert reward.scheduler.last_forwards == (3 if packs else 4)  # the group in one forward (the text-only row too)
        check(rewards, naive, reward)
