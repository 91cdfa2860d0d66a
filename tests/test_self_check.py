"""DDAPO_SELF_CHECK (ddapo.core.self_check, ddapo.call.RewardCall.self_check), in process on the tiny Qwen2.5-VL: on the
first call of a path a few outputs are scored again by the eager reference; an agreeing path is logged with its
difference, a fault is caught, every output of that call gets eager's reward, and the next calls read a path that
agrees. The faults are injected where the errors this check exists for live: a micro-batch row read one position off
(old_logps) and a pack without its members' position ids (own/shared: InternVL's defect)."""
import pytest
import torch

from conftest import make_policy
from test_old_logps import capture_for, micro_batch, old_logps_logits
from test_reward import COMPLETIONS, naive_reward, reward_kwargs, rows_of


@pytest.fixture
def log():
    """What ms-swift's logger writes during the test (its handler holds the stream it found at import)."""
    import logging
    from swift.utils import get_logger
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    get_logger().addHandler(handler)
    yield lines
    get_logger().removeHandler(handler)


def grouped_columns(policy):
    """Two outputs of one prompt, one of another prompt with a system message, and a text-only row."""
    columns = reward_kwargs(policy, COMPLETIONS, text_only_rows=(3,))
    columns['messages'][1] = list(columns['messages'][0][:1]) + [columns['messages'][1][1]]
    columns['images'][1] = columns['images'][0]
    columns['prompt_id'] = ['p0', 'p0', 'p1', 'p2']
    columns['messages'][2] = [{'role': 'system', 'content': 'Answer briefly.'}] + columns['messages'][2]
    columns['request_id'] = [f'r{i}' for i in range(4)]
    return columns


def old_logps_call(policy, columns, capture):
    samples, model_inputs = micro_batch(policy, columns)
    with capture(samples, model_inputs):
        old_logps_logits(policy, dict(model_inputs))


def shifted_placements(original):
    """The capture reads every sample's rows one position early: the structural check (ids at the sample's start)
    passes, the numbers are wrong."""
    from ddapo.core.packing import Placement

    def placements(*args, **kwargs):
        return [Placement(p.batch_index, p.start, range(p.rows.start - 1, p.rows.stop - 1))
                for p in original(*args, **kwargs)]
    return placements


class TestOldLogps:
    """The first call under old_logps is checked. Edge cases: agreement (the metric and the log line); a fault on every
    row (caught: the call's rewards equal naive, the path moves to own/shared for every later call, the channel is
    closed so GRPO's step is stock again, and own/shared is checked on its first call and agrees); DDAPO_SELF_CHECK=0
    (nothing checked, the fault's rewards stand)."""

    def test_agrees(self, qwen25, log):
        columns = grouped_columns(qwen25)
        capture, reward = capture_for(qwen25)
        old_logps_call(qwen25, columns, capture)
        rewards = reward(COMPLETIONS, **columns)
        verdict = reward.checked['old_logps']
        assert verdict.agrees and verdict.outputs == 3 and verdict.max_abs_diff < 1e-5
        assert reward.last_metrics['ddapo/self_check/max_abs_diff'] == verdict.max_abs_diff
        assert any('self-check: old_logps agrees with eager (max |diff| = ' in line for line in log)
        assert reward.swift.path.name == 'old_logps' and reward.uncaptured == 0
        assert rewards[3] is None and reward.scheduler.last_forwards == 0  # the check's forwards are not the path's

    @pytest.mark.self_check_fault
    def test_fault_caught_and_left(self, qwen25, monkeypatch, log):
        from ddapo.ms_swift import old_logps
        columns = grouped_columns(qwen25)
        from swift_patches import grpo_old_logps_scoring
        capture, reward = capture_for(qwen25)
        grpo_old_logps_scoring.open_channel(qwen25, capture)  # as choose_forward does for ms-swift's GRPOTrainer
        monkeypatch.setattr(old_logps, 'micro_batch_placements', shifted_placements(old_logps.micro_batch_placements))
        old_logps_call(qwen25, columns, capture)
        rewards = reward(COMPLETIONS, **columns)
        naive = [naive_reward(qwen25, row) for row in rows_of(columns)[:3]]
        verdict = reward.checked['old_logps']
        assert not verdict.agrees and verdict.max_abs_diff > 1e-3
        assert rewards[:3] == pytest.approx(naive, abs=1e-5) and rewards[3] is None  # eager's, this very call
        assert any('self-check: old_logps disagrees with eager' in line and 'moves to own/shared' in line
                   for line in log)
        assert reward.swift.path.name == 'own' and reward.swift.capture is None
        assert grpo_old_logps_scoring.channel(qwen25) is None  # the channel is closed: stock GRPO order
        again = reward(COMPLETIONS, **columns)  # the next call reads own/shared, checked on its first call
        assert reward.checked['own/shared'].agrees and again[:3] == pytest.approx(naive, abs=1e-5)

    def test_off(self, qwen25, monkeypatch):
        from ddapo.core.config import DDAPOConfig
        from ddapo.ms_swift import old_logps
        columns = grouped_columns(qwen25)
        capture, reward = capture_for(qwen25, DDAPOConfig(self_check=False))
        monkeypatch.setattr(old_logps, 'micro_batch_placements', shifted_placements(old_logps.micro_batch_placements))
        old_logps_call(qwen25, columns, capture)
        rewards = reward(COMPLETIONS, **columns)
        assert reward.checked == {} and 'ddapo/self_check/max_abs_diff' not in reward.last_metrics
        naive = [naive_reward(qwen25, row) for row in rows_of(columns)[:3]]
        assert max(abs(a - b) for a, b in zip(rewards[:3], naive)) > 1e-3  # the fault stands: nothing checked it


def running_positions(original):
    """A pack whose later members' positions run on after the earlier members' (what a model numbering the packed
    sequence 0 .. L - 1 itself did: InternVL's defect)."""

    def pack(members, prompt_len, num_generated):
        packed, rows = original(members, prompt_len, num_generated)
        positions = packed['position_ids'].clone()
        for g, (row, n) in enumerate(zip(rows, num_generated)):  # o_g numbered on after o_1 .. o_{g-1}
            positions[..., row.start:row.stop] += sum(num_generated[:g])
        return {**packed, 'position_ids': positions}, rows
    return pack


class TestOwnShared:
    """The first call under own/shared is checked. Edge case: a pack whose later members' positions run on after the
    earlier members' (what a model numbering the packed sequence 0 .. L - 1 itself did, InternVL's defect): caught, the call's
    rewards are eager's, the next calls run one output per forward (own/rows), checked in turn."""

    @pytest.mark.self_check_fault
    def test_fault_caught(self, qwen25, monkeypatch):
        from ddapo.core.config import DDAPOConfig
        from ddapo.engine import capture
        from ddapo.reward import DDAPOAttentionORM
        monkeypatch.setattr(capture, 'pack_shared_prompt', running_positions(capture.pack_shared_prompt))
        columns = grouped_columns(qwen25)
        reward = DDAPOAttentionORM(config=DDAPOConfig(forward='own'))
        rewards = reward(COMPLETIONS, **columns)
        naive = [naive_reward(qwen25, row) for row in rows_of(columns)[:3]]
        assert not reward.checked['own/shared'].agrees
        assert rewards[:3] == pytest.approx(naive, abs=1e-5)
        assert reward.scheduler.attention == 'rows'
        again = reward(COMPLETIONS, **columns)
        assert reward.checked['own/rows'].agrees and again[:3] == pytest.approx(naive, abs=1e-5)


@pytest.fixture(scope='module')
def qwen25_bf16(tiny_model_dir, tmp_path_factory):
    policy = make_policy(tiny_model_dir('qwen2_5_vl'), 'qwen2_5_vl', str(tmp_path_factory.mktemp('output')),
                         dtype=torch.bfloat16)
    yield policy
    policy.template.remove_post_encode_hook()


class TestHalfPrecision:
    """bf16 on CPU: the path and eager differ by rounding only, well inside the bf16 tolerance (no false alarm), and
    the injected fault is caught there too. (A GPU's bf16 kernels differ from the CPU's: docs/reward.md says what is
    not measured.)"""

    @pytest.mark.self_check_fault
    def test_tolerance(self, qwen25_bf16, monkeypatch):
        from ddapo.core.self_check import tolerance
        from ddapo.ms_swift import old_logps
        assert tolerance(torch.bfloat16) == 5e-3
        columns = grouped_columns(qwen25_bf16)
        capture, reward = capture_for(qwen25_bf16)
        old_logps_call(qwen25_bf16, columns, capture)
        reward(COMPLETIONS, **columns)
        clean = reward.checked['old_logps']
        assert clean.agrees and clean.max_abs_diff < tolerance(torch.bfloat16) / 5, clean
        capture, reward = capture_for(qwen25_bf16)
        monkeypatch.setattr(old_logps, 'micro_batch_placements', shifted_placements(old_logps.micro_batch_placements))
        old_logps_call(qwen25_bf16, columns, capture)
        reward(COMPLETIONS, **columns)
        assert not reward.checked['old_logps'].agrees, reward.checked


class TestReferenceFails:
    """The reference's own failure (eager runs out of memory: its full S x S maps are the largest of any path) is not
    the path's disagreement: those outputs are left out of the comparison, nothing is checked (the path is checked on
    a later call), the path's rewards stand and no rank moves."""

    def test_out_of_memory(self, qwen25, monkeypatch):
        import ddapo.self_check_stage
        from ddapo.engine.scheduler import ForwardScheduler

        class OutOfMemory(ForwardScheduler):
            def _run_unit(self, forward, unit, report, validate):
                def fails(**kwargs):
                    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 9.00 GiB')
                return super()._run_unit(fails, unit, report, validate)

        monkeypatch.setattr(ddapo.self_check_stage, 'ForwardScheduler', OutOfMemory)
        columns = grouped_columns(qwen25)
        capture, reward = capture_for(qwen25)
        old_logps_call(qwen25, columns, capture)
        rewards = reward(COMPLETIONS, **columns)
        assert reward.checked == {} and reward.swift.path.name == 'old_logps'
        assert rewards[:3] == pytest.approx([naive_reward(qwen25, row) for row in rows_of(columns)[:3]], abs=1e-5)
        assert reward.not_applicable == {'no_vision_keys': 1}  # the reference's failures are not the rows'


class TestOwnCheckUnderOldLogps:
    """Under old_logps a validation call reads the reward's own forwards: its own/shared check failing moves the own
    forwards (to own/rows) and leaves old_logps, checked or not, where it is (the channel stays open)."""

    @pytest.mark.self_check_fault
    def test_own_path_moves_alone(self, qwen25, monkeypatch):
        from swift_patches import grpo_old_logps_scoring
        from ddapo.core.config import DDAPOConfig
        from ddapo.engine import capture as engine_capture
        monkeypatch.setattr(engine_capture, 'pack_shared_prompt', running_positions(engine_capture.pack_shared_prompt))
        columns = grouped_columns(qwen25)
        capture, reward = capture_for(qwen25, DDAPOConfig(validate_steps=1))
        grpo_old_logps_scoring.open_channel(qwen25, capture)
        try:
            rewards = reward(COMPLETIONS, **columns)  # a validation call: own/shared
            assert not reward.checked['own/shared'].agrees and 'old_logps' not in reward.checked
            assert reward.swift.path.name == 'old_logps' and grpo_old_logps_scoring.channel(qwen25) is capture
            assert reward.scheduler.attention == 'rows'
            assert rewards[:3] == pytest.approx([naive_reward(qwen25, r) for r in rows_of(columns)[:3]], abs=1e-5)
        finally:
            grpo_old_logps_scoring.open_channel(qwen25, None)


class TestPureParts:
    """ddapo.core.self_check: the difference, the sample, the tolerance per dtype, the next path (doctests there);
    edge cases: a reward on one side only is a disagreement; a reference failure is left out; a dtype it does not
    know takes float32's; a path that disagreed is never moved to."""

    def test_edges(self):
        from ddapo.core.self_check import Verdict, difference, next_path, tolerance
        assert difference([None, 0.3], [None, 0.3]) == (0.0, 2) and difference([None], [0.3]) == (float('inf'), 1)
        assert difference([0.3], [None], ['no_vision_keys']) == (float('inf'), 1)  # a reason of the row: compared
        assert tolerance('torch.float8_e4m3fn') == tolerance('float32') and tolerance('tf32') == 5e-3
        assert Verdict('own/rows', 2e-4, 3, 1e-4).message('own/eager').count('moves to own/eager') == 1
        assert next_path('old_logps', 'shared', ['own/shared', 'own/rows']) == 'own/eager'
