"""Failing safe, in process: a reward call never raises on one rank before the call's collectives (every rank
stops together, after the one gather), one bad row never costs the call, diagnostics never cost the step, and the
report lands on the steps the trainer logs. The two-node run in which only one rank meets the error is
test_deepspeed.TestStopsOnEveryRank."""
from types import SimpleNamespace

import pytest

from ddapo.core.config import DDAPOConfig
from ddapo.reward import DDAPOAttentionORM
from test_reward import COMPLETIONS, reward_kwargs

# what these tests check does not depend on the model family: one, for the suite's time
ONE_FAMILY = pytest.mark.parametrize('policy', ['qwen2_5_vl'], indirect=True)


@pytest.fixture
def gathers(monkeypatch):
    """Every gather the reward makes, in order (the call's collectives), on the real SwiftTrainer."""
    from ddapo.ms_swift.adapter import SwiftTrainer
    seen = []
    real = SwiftTrainer.gather

    def gather(self, values):
        seen.append(values)
        return real(self, values)

    monkeypatch.setattr(SwiftTrainer, 'gather', gather)
    return seen


@ONE_FAMILY
class TestStopOnEveryRank:
    """Each decision that ends a call is carried through the call's one gather and raised after it, naming the rank
    that met it: DDAPO_STRICT=1 on a text-only row, token weights for rows without request_id, a gate reward that
    returns too few values. Edge cases: the call's other rows are still encoded and run; the gate reward runs on a rank
    that is stopping."""

    def test_strict(self, policy, gathers):
        columns = reward_kwargs(policy, COMPLETIONS[:3], text_only_rows=(1,))
        with pytest.raises(RuntimeError, match=r'stopped the run on every rank: rank 0: DDAPO_STRICT=1: .*'
                                               r'\(no_vision_keys\)'):
            DDAPOAttentionORM(config=DDAPOConfig(strict=True))(COMPLETIONS[:3], **columns)
        share, = gathers[-1]
        assert share.stop.startswith('DDAPO_STRICT=1') and share.outputs == []

    def test_token_weights_without_request_id(self, policy, gathers, monkeypatch):
        from swift.rlhf_trainers.grpo_trainer import GRPOTrainer

        from swift_patches import grpo_token_weights
        monkeypatch.setattr(GRPOTrainer, '_postprocess_batch', GRPOTrainer._postprocess_batch)
        grpo_token_weights.apply()
        try:
            with pytest.raises(RuntimeError, match='rank 0: .*DDAPO_TOKEN_WEIGHTS=1 hands token weights .*request_id'):
                DDAPOAttentionORM(config=DDAPOConfig(token_weights=True))(COMPLETIONS[:1],
                                                                          **reward_kwargs(policy, COMPLETIONS[:1]))
        finally:
            if getattr(policy, grpo_token_weights.STORE, None) is not None:
                delattr(policy, grpo_token_weights.STORE)
        assert len(gathers) == 2 and gathers[0][0]['own/shared'][1] == 1  # the self-check's (one output), the call's

    def test_gate_reward_too_few_values(self, policy, gathers, monkeypatch):
        from swift.rewards import orms
        monkeypatch.setitem(orms, 'short_gate', lambda args=None: (lambda completions, **kwargs: [1.0]))
        columns = reward_kwargs(policy, COMPLETIONS[:3])
        columns['prompt_id'] = ['p'] * 3
        reward = DDAPOAttentionORM(config=DDAPOConfig(reward='gated', gate_reward='short_gate'))
        with pytest.raises(RuntimeError, match='DDAPO_GATE_REWARD=short_gate: ValueError: it returned 1 values for 3'):
            reward(COMPLETIONS[:3], **columns)
        assert len(gathers) == 2  # the self-check's, the call's

    def test_gate_runs_on_a_stopping_rank(self, policy, gathers, monkeypatch):
        """The gate reward runs on every rank, stopping or not (it may itself be collective)."""
        from swift.rewards import orms
        calls = []
        monkeypatch.setitem(orms, 'counting_gate', lambda args=None: (
            lambda completions, **kwargs: calls.append(len(completions)) or [1.0] * len(completions)))
        columns = reward_kwargs(policy, COMPLETIONS[:3], text_only_rows=(1,))
        columns['prompt_id'] = ['p'] * 3
        reward = DDAPOAttentionORM(config=DDAPOConfig(reward='gated', gate_reward='counting_gate', strict=True))
        with pytest.raises(RuntimeError, match='rank 0: DDAPO_STRICT=1'):
            reward(COMPLETIONS[:3], **columns)
        assert calls == [3] and len(gathers) == 2  # the self-check's gather, then the call's one


@ONE_FAMILY
class TestOneBadRow:
    """A row the template cannot encode (its image file cannot be read) gets None, counted as encoding_failed; an
    output whose scoring raises gets None, counted as scoring_failed; the call's other rows are scored."""

    def test_failure_while_scoring_one_output(self, policy, monkeypatch):
        """An output whose scoring raises is one None, counted as scoring_failed; the call and its other outputs go
        on."""
        import ddapo.call
        real, seen = ddapo.call.score_output, []

        def fails_once(*args, **kwargs):
            seen.append(1)
            if len(seen) == 2:
                raise ZeroDivisionError('a bad output')
            return real(*args, **kwargs)

        monkeypatch.setattr(ddapo.call, 'score_output', fails_once)
        reward = DDAPOAttentionORM(config=DDAPOConfig(self_check=False))
        rewards = reward(COMPLETIONS[:3], **reward_kwargs(policy, COMPLETIONS[:3]))
        assert rewards[1] is None and rewards[0] is not None and rewards[2] is not None
        assert reward.not_applicable == {'scoring_failed': 1}

    def test_unreadable_image(self, policy, tmp_path):
        columns = reward_kwargs(policy, COMPLETIONS[:3])
        columns['images'][1] = [str(tmp_path / 'missing.png')]
        reward = DDAPOAttentionORM()
        rewards = reward(COMPLETIONS[:3], **columns)
        assert rewards[1] is None and rewards[0] is not None and rewards[2] is not None
        assert reward.not_applicable == {'encoding_failed': 1}
        assert reward.last_metrics['ddapo/not_applicable/encoding_failed_frac'] == pytest.approx(1 / 3)


@ONE_FAMILY
class TestDiagnosticsNeverKillTraining:
    """The report's samples, its writing and the trackers are diagnostics: each failure is warned once, counted per
    step in ddapo/diagnostics_failed/<kind>, and the rewards are the same as without it. Edge cases: a heat map that
    cannot be laid out (ValueError), an image that cannot be read, the report's files, a tracker's image API."""

    @staticmethod
    def run(policy, tmp_path, monkeypatch, **extra):
        monkeypatch.setattr(policy.args, 'output_dir', str(tmp_path))
        reward = DDAPOAttentionORM()
        logged = []
        monkeypatch.setattr(policy, '_metrics', {'train': _Appender(logged)}, raising=False)
        rewards = reward(COMPLETIONS[:2], **reward_kwargs(policy, COMPLETIONS[:2]), **extra)
        return reward, rewards, dict(logged)

    @pytest.mark.parametrize('target, kind', [('ddapo.step_log.image_heatmaps', 'report_sample'),
                                              ('ddapo.ms_swift.trainer_io.load_pil_img', 'report_sample'),
                                              ('ddapo.core.report.ReportWriter.write_step', 'report')])
    def test_report_failures(self, policy, tmp_path, monkeypatch, target, kind):
        expected = DDAPOAttentionORM(config=DDAPOConfig(report=False))(COMPLETIONS[:2],
                                                                       **reward_kwargs(policy, COMPLETIONS[:2]))
        module, name = target.rsplit('.', 1)
        owner = _resolve(module)

        def broken(*args, **kwargs):
            raise ValueError('cannot lay out this picture')

        monkeypatch.setattr(owner, name, broken)
        reward, rewards, logged = self.run(policy, tmp_path, monkeypatch)
        assert rewards == expected
        assert reward.diagnostics_failed[kind] >= 1 and logged[f'ddapo/diagnostics_failed/{kind}'] >= 1
        assert 'ddapo/M_V/mean' in logged  # the step's metrics are all there

    def test_tracker_failure(self, policy, tmp_path, monkeypatch):
        class Writer:
            def add_image(self, *args, **kwargs):
                raise OSError('the event file is gone')

        callback = type('TensorBoardCallback', (), {'tb_writer': Writer()})()
        monkeypatch.setattr(policy, 'callback_handler', SimpleNamespace(callbacks=[callback]), raising=False)
        reward, rewards, logged = self.run(policy, tmp_path, monkeypatch)
        assert all(r is not None for r in rewards) and logged['ddapo/diagnostics_failed/trackers'] == 1
        assert (tmp_path / 'ddapo' / 'report.md').exists()  # the report itself was written


class _Appender(dict):
    """The trainer's metrics store as the reward sees it (``store[mode][key].append(value)``), flattened."""

    def __init__(self, logged):
        super().__init__()
        self.logged = logged

    def __getitem__(self, key):
        logged = self.logged
        return SimpleNamespace(append=lambda value: logged.append((key, value)))


def _resolve(dotted):
    import importlib
    parts = dotted.split('.')
    for i in range(len(parts), 0, -1):
        try:
            owner = importlib.import_module('.'.join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[i:]:
            owner = getattr(owner, attribute)
        return owner
    raise ImportError(dotted)


class TestReportSteps:
    """StepLogger.choose reports on the steps the trainer logs its scalars (the first, and every logging_steps-th),
    once per step, and on every validation step: with logging_steps 1, 2 and 3 over 7 steps. Edge case: a second
    call within one step (gradient accumulation) writes no second report."""

    @pytest.mark.parametrize('logging_steps, expected', [(1, [1, 2, 3, 4, 5, 6, 7]), (2, [1, 2, 4, 6]),
                                                         (3, [1, 3, 6])])
    def test_logged_steps(self, logging_steps, expected):
        from ddapo.step_log import StepLogger
        logger = StepLogger(DDAPOConfig())
        outputs = [SimpleNamespace(position=0, row=SimpleNamespace(prompt_id='p'))]
        reported = []
        for step in range(7):  # global_step while the rewards of logged step step + 1 are computed
            for _ in range(2):
                if logger.choose(outputs, True, step, logging_steps):
                    reported.append(step + 1)
                    logger._last_report = (step, 'train')  # as log() does when it writes the step
        assert reported == expected

    def test_calls_every_second_step(self):
        """--steps_per_generation 2: calls at global steps 0, 2, 4, 6 (each trains two steps); with logging_steps 2 the
        report lands on every call, since each holds a logged step (the old rule, (step + 1) % 2, never fired after
        the first)."""
        from ddapo.step_log import StepLogger
        logger = StepLogger(DDAPOConfig())
        outputs = [SimpleNamespace(position=0, row=SimpleNamespace(prompt_id='p'))]
        assert [s + 1 for s in (0, 2, 4, 6) if logger.choose(outputs, True, s, 2)] == [1, 3, 5, 7]

    def test_evaluation_and_training_at_one_step(self):
        """A held-out evaluation (--eval_strategy steps) at a logged step and that step's training call each get a
        report section."""
        from ddapo.step_log import StepLogger
        logger = StepLogger(DDAPOConfig())
        outputs = [SimpleNamespace(position=0, row=SimpleNamespace(prompt_id='p'))]
        assert logger.choose(outputs, True, 1, 2, mode='eval')
        logger._last_report = (1, 'eval')  # as log() does when it writes the step
        assert logger.choose(outputs, True, 1, 2, mode='train') and not logger.choose(outputs, True, 1, 2, mode='eval')

    def test_validation_steps_too(self):
        from ddapo.step_log import StepLogger
        logger = StepLogger(DDAPOConfig(validate_steps=2))
        outputs = [SimpleNamespace(position=0, row=SimpleNamespace(prompt_id='p'))]
        assert logger.choose(outputs, True, 2, 4, validate=False) == {}
        assert logger.choose(outputs, True, 2, 4, validate=True)
