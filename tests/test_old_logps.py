"""DDAPO_FORWARD=old_logps: attention read inside ms-swift's old log-prob forward (the third patch,
swift_patches/grpo_old_logps_scoring.py, and ddapo.ms_swift.old_logps), in process. The real runs, in which GRPO's
old log-probs and loss are compared bit for bit with DDAPO_FORWARD=own, are in test_swift_rlhf_e2e.TestForwardPath.
"""
import os
import subprocess
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from conftest import make_policy
from test_reward import COMPLETIONS, naive_reward, reward_kwargs, rows_of
from test_swift_patch import ROOT, swift_site_dir

DIFF = os.path.join(ROOT, 'swift_patches', 'ms_swift_4.6_grpo_old_logps_scoring.diff')


@pytest.fixture(scope='module', params=['qwen2_5_vl', 'qwen3_5'])
def policy(request, tiny_model_dir, tmp_path_factory):
    policy = make_policy(tiny_model_dir(request.param), request.param, str(tmp_path_factory.mktemp('output')))
    policy.model_type = request.param
    yield policy
    policy.template.remove_post_encode_hook()


@contextmanager
def trainer_attention(policy, implementation):
    """The trainer's attention implementation (``--attn_impl``) on the language model for the block."""
    from ddapo.ms_swift.attention import language_config
    config = language_config(policy.model.config)
    saved, config._attn_implementation = config._attn_implementation, implementation
    try:
        yield
    finally:
        config._attn_implementation = saved


def micro_batch(policy, columns, layout='right'):
    """The micro-batch ms-swift's ``_prepare_batch_inputs`` builds from these rows, in its own steps: each a GRPOSample
    with a request id (``columns['request_id']`` where given), encoded with ``encode_sample`` inside the trainer's
    ``_template_context`` (no truncation) and collated by ``collate_to_grpo_micro_batch``, on the template's
    ``--padding_side`` (``layout`` right or left) or packed (``packed``: ``--padding_free``)."""
    from swift.rl_core.data import GRPOSample
    from swift.rlhf_trainers.rollout_mixin import RolloutTrainerMixin
    from swift.rlhf_trainers.utils import collate_to_grpo_micro_batch, encode_sample
    rows = rows_of(columns)
    samples = [GRPOSample.from_row({'request_id': f'r{i}', **row.columns}) for i, row in enumerate(rows)]
    template = policy.template
    saved = template.padding_side, template.padding_free
    template.padding_side, template.padding_free = ('left' if layout == 'left' else 'right'), layout == 'packed'
    try:
        with RolloutTrainerMixin._template_context(SimpleNamespace(model=policy.model), template):
            for sample in samples:
                encoded = encode_sample(sample, template)
                encoded.pop('_extra_kwargs', None)  # as _prepare_batch_inputs does
                sample.encoded = encoded
            model_inputs, _ = collate_to_grpo_micro_batch(samples, template, device=torch.device('cpu'),
                                                          use_logits_to_keep=True)
    finally:
        template.padding_side, template.padding_free = saved
    model_inputs.pop('labels', None)
    return samples, model_inputs


@contextmanager
def trainer_layout(policy, layout):
    """The template as the trainer's (``--padding_side``, ``--padding_free``) for the block: the capture reads it."""
    template = policy.template
    saved = template.padding_side, template.padding_free
    template.padding_side, template.padding_free = ('left' if layout == 'left' else 'right'), layout == 'packed'
    try:
        yield
    finally:
        template.padding_side, template.padding_free = saved


def old_logps_logits(policy, model_inputs):
    """The forward ``_get_logps_via_local_forward`` runs: the trainer's model, train mode, no grad."""
    policy.model.train()
    with torch.no_grad():
        return policy.model(**model_inputs).logits


def capture_for(policy, config=None):
    """An `OldLogpsCapture` on ``policy`` and a reward whose calls read it (as ``choose_forward`` sets them up in a
    real GRPO run, where the trainer is ms-swift's GRPOTrainer)."""
    from ddapo.core.config import DDAPOConfig
    from ddapo.ms_swift.old_logps import OLD_LOGPS, ForwardPath, OldLogpsCapture
    from ddapo.reward import DDAPOAttentionORM
    config = config or DDAPOConfig(forward='auto')
    reward = DDAPOAttentionORM(config=config)
    reward.on_trainer_init(policy)
    swift = reward.swift
    swift.capture = OldLogpsCapture(policy, swift.spec, swift.system_turns, config, config.report_samples,
                                    reward.validating)
    swift.path = ForwardPath(OLD_LOGPS, 'test')
    return swift.capture, reward


class TestCaptureInsideOldLogpsForward:
    """The capture around the forward ms-swift runs for old_per_token_logps, on its own collated micro-batch (right
    padding: completions of different lengths; a text-only row): the logits are bit for bit those without the capture,
    and each output's R^bal equals the reward's own forward and the naive eager computation (fp32, 1e-5), with no
    forward of the reward's own; the report draws each image's heat map. Edge cases: the trainer on sdpa and on eager;
    the hybrid Qwen3.5; a row whose generated ids are not in the trainer's encoding (None, counted); a row the forward
    did not capture (a forward of its own)."""

    @pytest.mark.parametrize('implementation', ['sdpa', 'eager'])
    def test_same_logits_same_rewards(self, policy, implementation):
        from ddapo.core.config import DDAPOConfig
        from ddapo.reward import DDAPOAttentionORM
        columns = reward_kwargs(policy, COMPLETIONS, text_only_rows=(2,))
        columns['request_id'] = [f'r{i}' for i in range(len(COMPLETIONS))]
        samples, model_inputs = micro_batch(policy, columns)
        assert len({len(s.encoded['input_ids']) for s in samples}) > 1  # right padding in the batch
        capture, reward = capture_for(policy)
        started = time.time()
        with trainer_attention(policy, implementation):
            plain = old_logps_logits(policy, dict(model_inputs))
            with capture(samples, model_inputs):
                captured = old_logps_logits(policy, dict(model_inputs))
        assert torch.equal(plain, captured)
        rewards = reward(COMPLETIONS, **columns)
        assert reward.scheduler.last_forwards == 0 and reward.last_metrics['ddapo/own_forwards'] == 0
        # the report's heat map: each sample's image grid, which ms-swift's collator moved into the micro-batch
        picture = os.path.join(policy.args.output_dir, 'ddapo', 'step0000001_train_sample0_image0.png')
        assert os.path.exists(picture) and os.path.getmtime(picture) >= started - 1
        own = DDAPOAttentionORM(config=DDAPOConfig(forward='own'))(COMPLETIONS, **columns)
        assert rewards[2] is None and own[2] is None and reward.not_applicable == {'no_vision_keys': 1}
        scored = [i for i in range(len(COMPLETIONS)) if i != 2]
        assert [rewards[i] for i in scored] == pytest.approx([own[i] for i in scored], abs=1e-5)
        naive = [naive_reward(policy, rows_of(columns)[i]) for i in scored]
        assert [rewards[i] for i in scored] == pytest.approx(naive, abs=1e-5)
        assert max(rewards[i] for i in scored) - min(rewards[i] for i in scored) > 1e-3

    def test_mismatched_row_and_uncaptured_row(self, policy):
        columns = reward_kwargs(policy, COMPLETIONS[:3])
        columns['request_id'] = ['r0', 'r1', 'r2']
        samples, model_inputs = micro_batch(policy, columns)
        samples[1].response_token_ids = [[7, 7, 7]]  # not what the trainer encoded
        capture, reward = capture_for(policy)
        with capture(samples[:2], model_inputs):  # r2 runs in the forward, but is not handed to the capture
            old_logps_logits(policy, dict(model_inputs))
        rewards = reward(COMPLETIONS[:3], **columns)  # r2 was never captured: a forward of its own
        assert rewards[1] is None and reward.not_applicable == {'generated_ids_mismatch': 1}
        assert rewards[0] is not None and rewards[2] is not None
        assert reward.uncaptured == 1 and reward.scheduler.last_forwards == 1


    def test_setup_failure_leaves_the_forward_alone(self, policy, monkeypatch):
        """A failure while the capture is set up never reaches the trainer's forward: its logits are the same, and the
        micro-batch's rows are scored with forwards of the reward's own (counted), equal to the own path."""
        from ddapo.ms_swift import old_logps
        columns = reward_kwargs(policy, COMPLETIONS[:2])
        columns['request_id'] = ['r0', 'r1']
        samples, model_inputs = micro_batch(policy, columns)
        capture, reward = capture_for(policy)
        plain = old_logps_logits(policy, dict(model_inputs))

        def broken(original):
            raise RuntimeError('cannot register')

        monkeypatch.setattr(old_logps, 'wrapped_attention', broken)
        with capture(samples, model_inputs):
            captured = old_logps_logits(policy, dict(model_inputs))
        assert torch.equal(plain, captured) and capture.take() == {}
        rewards = reward(COMPLETIONS[:2], **columns)
        assert reward.uncaptured == 2 and reward.last_metrics['ddapo/own_forwards'] > 0
        from ddapo.core.config import DDAPOConfig
        from ddapo.reward import DDAPOAttentionORM
        assert rewards == DDAPOAttentionORM(config=DDAPOConfig(forward='own'))(COMPLETIONS[:2], **columns)


class TestPackedRows:
    """--padding_free packs the samples of a micro-batch into one row with no mask (flash attention): the eager
    formula of a later sample's rows, from its start, equals the same rows of its own sequence. Edge cases: a
    cache-free causal block inside the packed row; grouped-query heads."""

    def test_packed_equals_separate(self):
        from ddapo.engine.capture import eager_rows
        torch.manual_seed(0)
        lengths, heads, kv_heads, dim = (5, 7), 4, 2, 8
        query = torch.randn(1, heads, sum(lengths), dim)
        key = torch.randn(1, kv_heads, sum(lengths), dim)
        start = lengths[0]
        packed = eager_rows(query, key, None, 0, slice(start + 3, start + 7), 0.3, groups=2, key_start=start)
        alone = eager_rows(query[..., start:, :], key[..., start:, :], None, 0, slice(3, 7), 0.3, groups=2)
        assert torch.allclose(packed, alone, atol=1e-7) and packed.shape == (heads, 4, 7)
        first = eager_rows(query, key, None, 0, slice(2, 5), 0.3, groups=2, key_start=0)
        assert torch.allclose(first, eager_rows(query[..., :5, :], key[..., :5, :], None, 0, slice(2, 5), 0.3, 2))


def grpo_trainer(policy, **args):
    """An object of ms-swift's GRPOTrainer class with the attributes the path decision reads (no training set up)."""
    from swift.rlhf_trainers.grpo_trainer import GRPOTrainer
    trainer = object.__new__(GRPOTrainer)
    trainer.__dict__.update(model=policy.model, template=policy.template, accelerator=policy.accelerator,
                            args=SimpleNamespace(dynamic_sample=False, **args), dynamic_num_samples=False)
    return trainer


@pytest.fixture
def applied():
    from swift_patches import grpo_old_logps_scoring
    grpo_old_logps_scoring.apply()


class TestForwardPath:
    """Which path a run takes (DDAPO_FORWARD): old_logps wherever it is exact; under auto, own otherwise, naming why
    and the fix; DDAPO_FORWARD=old_logps where it cannot be exact fails at start. Edge cases: dynamic_sample,
    sequence parallelism, LoRA dropout, an implementation the capture does not wrap, a trainer
    that is not GRPOTrainer, padding_free (opt-in only), the patch not applied."""

    def test_exact_run(self, policy, applied):
        from ddapo.ms_swift.old_logps import forward_path
        trainer = grpo_trainer(policy)
        assert forward_path(trainer, 'auto').name == 'old_logps'
        assert forward_path(trainer, 'old_logps').name == 'old_logps'
        assert forward_path(trainer, 'own').name == 'own'

    @pytest.mark.parametrize('change, expected', [
        (lambda t: setattr(t.args, 'dynamic_sample', True), '--dynamic_sample true'),
        (lambda t: setattr(t, 'template', SimpleNamespace(sequence_parallel_size=2, padding_free=False)),
         '--sequence_parallel_size'),
    ])
    def test_auto_falls_back(self, policy, applied, change, expected):
        from ddapo.ms_swift.old_logps import forward_path
        trainer = grpo_trainer(policy)
        change(trainer)
        path = forward_path(trainer, 'auto')
        assert path.name == 'own' and expected in path.why and 'DDAPO_FORWARD=auto, falling back' in path.why
        with pytest.raises(ValueError, match=f'DDAPO_FORWARD=old_logps cannot read.*{expected[:12]}'):
            forward_path(trainer, 'old_logps')

    def test_dropout_names_the_fix(self, policy, applied):
        from ddapo.ms_swift.old_logps import forward_path
        trainer = grpo_trainer(policy)
        language_model = policy.model.model.language_model
        language_model.lora_dropout = torch.nn.ModuleDict({'default': torch.nn.Dropout(0.05)})  # as peft names it
        try:
            path = forward_path(trainer, 'auto')
            language_model.lora_dropout['default'].p = 0.0  # --lora_dropout 0: exact again
            exact = forward_path(trainer, 'auto')
        finally:
            del language_model.lora_dropout
        assert path.name == 'own' and 'dropout is active' in path.why and '(fix: --lora_dropout 0)' in path.why
        assert 'lora_dropout.default' in path.why and exact.name == 'old_logps'

    def test_implementation_and_padding_free(self, policy, applied):
        from ddapo.ms_swift.old_logps import forward_path
        trainer = grpo_trainer(policy)
        with trainer_attention(policy, 'flex_attention'):
            assert "attention implementation 'flex_attention'" in forward_path(trainer, 'auto').why
        policy.template.padding_free = True
        try:
            assert forward_path(trainer, 'auto').name == 'own'
            opted = forward_path(trainer, 'old_logps')
        finally:
            policy.template.padding_free = False
        assert opted.name == 'old_logps' and 'opted into: --padding_free' in opted.why

    def test_not_grpo_trainer_and_patch_missing(self, policy, monkeypatch):
        from ddapo.ms_swift.old_logps import forward_path
        from swift_patches import grpo_old_logps_scoring
        assert 'not ms-swift\'s GRPOTrainer' in forward_path(policy, 'auto').why
        monkeypatch.setattr(grpo_old_logps_scoring, 'is_applied', lambda: False)
        monkeypatch.setattr(grpo_old_logps_scoring, 'UNAVAILABLE', 'cannot patch ms-swift 9.0')
        why = forward_path(grpo_trainer(policy), 'auto').why
        assert 'grpo_old_logps_scoring.py is not applied (cannot patch ms-swift 9.0)' in why


class Recorder(SimpleNamespace):
    """A stand-in trainer recording the order of the GRPO step's stages."""

    def __init__(self, **kwargs):
        super().__init__(calls=[], args=SimpleNamespace(report_to=[]), **kwargs)  # args: ms-swift's profiling
        for stage in ('_rollout_samples', '_score_completions', '_prepare_batch_inputs', '_log_rollout'):
            setattr(self, stage, lambda x, stage=stage: self.calls.append(stage) or x)
        self._postprocess_batch = lambda samples, batches: self.calls.append('_postprocess_batch')


class TestRuntimePatch:
    """The patched skeleton: stock order without the channel; with it, the rewards after _prepare_batch_inputs and
    before the advantages. Edge cases: apply is idempotent and keeps the stock methods as __wrapped__; a skeleton it
    does not know is refused (plugin.py then leaves it off and the reward falls back)."""

    def test_order(self, applied):
        from swift.rlhf_trainers.grpo_trainer import GRPOTrainer

        from swift_patches import grpo_old_logps_scoring
        stock = Recorder()
        GRPOTrainer._generate_and_score_completions(stock, ['row'])
        assert stock.calls == ['_rollout_samples', '_score_completions', '_prepare_batch_inputs',
                               '_postprocess_batch', '_log_rollout']
        reordered = Recorder()
        grpo_old_logps_scoring.open_channel(reordered, lambda batch, inputs: None)
        assert GRPOTrainer._generate_and_score_completions(reordered, ['row']) == ['row']
        assert reordered.calls == ['_rollout_samples', '_prepare_batch_inputs', '_score_completions',
                                   '_postprocess_batch', '_log_rollout']

    def test_idempotent_and_wrapped(self, applied):
        from swift.rlhf_trainers.grpo_trainer import GRPOTrainer
        from swift.rlhf_trainers.rollout_mixin import RolloutTrainerMixin

        from swift_patches import grpo_old_logps_scoring
        assert grpo_old_logps_scoring.apply() == 'already applied' and grpo_old_logps_scoring.is_applied()
        assert GRPOTrainer._generate_and_score_completions.__wrapped__ is \
            RolloutTrainerMixin._generate_and_score_completions

    def test_refuses_unknown_skeleton(self, monkeypatch):
        from swift.rlhf_trainers import grpo_trainer

        from swift_patches import grpo_old_logps_scoring
        for name in ('_prepare_batch_inputs', '_get_per_token_logps_and_entropies', '_generate_and_score_completions'):
            current = getattr(grpo_trainer.GRPOTrainer, name)
            monkeypatch.setattr(grpo_trainer.GRPOTrainer, name, getattr(current, '__wrapped__', current))

        def skeleton(self, inputs):
            samples = self._rollout_samples(inputs)
            batch_encoded_inputs = self._prepare_batch_inputs(samples)
            return batch_encoded_inputs

        monkeypatch.setattr(grpo_trainer.GRPOTrainer, '_generate_and_score_completions', skeleton)
        with pytest.raises(grpo_old_logps_scoring.PatchError, match='not the rollout / score / prepare'):
            grpo_old_logps_scoring.apply()


def check_diff_installed():
    """On an ms-swift with the diff applied: the runtime patch stands down and the stages run in the new order once
    the channel is open (run by test_token_weights_patch.TestDiff on its copy with all three diffs)."""
    from swift.rlhf_trainers.grpo_trainer import GRPOTrainer

    from swift_patches import grpo_old_logps_scoring
    assert grpo_old_logps_scoring.apply() == 'diff installed' and grpo_old_logps_scoring.is_applied()
    recorder = Recorder()
    grpo_old_logps_scoring.open_channel(recorder, lambda batch, inputs: None)
    GRPOTrainer._generate_and_score_completions(recorder, [])
    assert recorder.calls[1:3] == ['_prepare_batch_inputs', '_score_completions'], recorder.calls


class TestDiff:
    """The unified diff applies to the installed ms-swift. On a copy with it applied (after the other two), the
    runtime patch stands down and the stages run reordered: `check_diff_installed`, run on the one patched copy of
    test_token_weights_patch.TestDiff."""

    def test_dry_run_on_installed_swift(self):
        result = subprocess.run(['patch', '-p1', '--dry-run', '-i', DIFF], cwd=swift_site_dir(), capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stdout + result.stderr


class TestFallbacksPerCall:
    """What the capture cannot read exactly in a call is left to the reward's own forwards, exact, counted and warned
    once per cause; the trainer's logits never change. Edge cases: a layout the capture does not know (the template
    says right padding, the batch is left-padded: the structural check finds every sample's ids elsewhere); a capture
    that fails inside the forward (the recording raises); a rollout in which ms-swift's own server rollout sets
    ``dynamic_num_samples`` (a scheduler that split a trajectory: two samples share a request_id), then a rollout that
    does not (the capture reads again)."""

    def run(self, policy, columns, samples, model_inputs, capture, layout='right'):
        with trainer_layout(policy, layout):
            plain = old_logps_logits(policy, dict(model_inputs))
            with capture(samples, model_inputs):
                captured = old_logps_logits(policy, dict(model_inputs))
        assert torch.equal(plain, captured)

    def test_unknown_layout(self, policy):
        columns = reward_kwargs(policy, COMPLETIONS[:3])
        samples, model_inputs = micro_batch(policy, columns, layout='left')
        capture, reward = capture_for(policy)
        self.run(policy, columns, samples, model_inputs, capture, layout='right')  # the capture believes right
        assert capture.fallbacks['misplaced'] == 2  # the longest sample fills its row: its ids are where expected
        columns['request_id'] = [s.request_id for s in samples]
        rewards = reward(COMPLETIONS[:3], **columns)
        assert reward.uncaptured == 2 and reward.last_metrics['ddapo/own_forwards'] > 0
        assert rewards == pytest.approx([naive_reward(policy, row) for row in rows_of(columns)], abs=1e-5)

    def test_capture_fails_inside_forward(self, policy, monkeypatch):
        from ddapo.engine import capture as engine_capture
        columns = reward_kwargs(policy, COMPLETIONS[:2])
        samples, model_inputs = micro_batch(policy, columns)
        capture, reward = capture_for(policy)

        def broken(*args, **kwargs):
            raise IndexError('a layout the recording cannot index')

        monkeypatch.setattr(engine_capture, 'eager_rows', broken)
        self.run(policy, columns, samples, model_inputs, capture)
        monkeypatch.undo()
        assert capture.fallbacks['capture_failed'] == 2
        columns['request_id'] = [s.request_id for s in samples]
        rewards = reward(COMPLETIONS[:2], **columns)
        assert reward.uncaptured == 2
        assert rewards == pytest.approx([naive_reward(policy, row) for row in rows_of(columns)], abs=1e-5)

    def test_dynamic_num_samples_set_by_the_rollout(self, policy):
        from swift.rlhf_trainers.grpo_trainer import GRPOTrainer
        trainer = grpo_trainer(policy)
        trainer.__dict__.update(enable_server_multi_turn=True, dynamic_sample=False,
                                samples2requests=lambda samples: list(samples))
        columns = reward_kwargs(policy, COMPLETIONS[:2])
        columns['prompt_id'] = ['p0', 'p0']

        def rollout(outputs_per_request):
            response = SimpleNamespace(id='split')  # ms-swift sorts a rollout's outputs by their response id
            trainer._engine_infer = lambda infer_requests, request_config: [
                SimpleNamespace(response=response) for _ in infer_requests for _ in range(outputs_per_request)]
            GRPOTrainer._server_rollout(trainer, ['request'], None, is_global_inputs=False)  # ms-swift's own rollout

        rollout(2)  # the scheduler returned two samples for the request: ms-swift sets the flag now
        assert trainer.dynamic_num_samples
        columns['request_id'] = ['split', 'split']  # the splits of one trajectory
        samples, model_inputs = micro_batch(policy, columns)
        capture, reward = capture_for(policy)
        capture.trainer = trainer
        self.run(policy, columns, samples, model_inputs, capture)
        assert capture.fallbacks['dynamic_num_samples'] == 2 and capture.take() == {}
        rollout(1)  # one sample per request: the next step reads the old log-prob forward again
        assert not trainer.dynamic_num_samples
        columns['request_id'] = ['a', 'b']
        samples, model_inputs = micro_batch(policy, columns)
        self.run(policy, columns, samples, model_inputs, capture)
        assert sorted(capture.take()) == ['a', 'b']

    def test_shared_request_id(self, policy):
        columns = reward_kwargs(policy, COMPLETIONS[:3])
        columns['request_id'] = ['same', 'same', 'other']
        samples, model_inputs = micro_batch(policy, columns)
        capture, reward = capture_for(policy)
        self.run(policy, columns, samples, model_inputs, capture)
        assert capture.fallbacks['shared_request_id'] == 2
        rewards = reward(COMPLETIONS[:3], **columns)
        assert reward.uncaptured == 2  # 'other' was captured; both 'same' rows got forwards of their own
        assert rewards == pytest.approx([naive_reward(policy, row) for row in rows_of(columns)], abs=1e-5)
