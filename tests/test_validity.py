"""Validity diagnostics, Eq. (12)-(14) (ddapo.core.validity and DDAPO_VALIDATE_STEPS): the pure functions one class
each, the scheduler's extra forward and its lockstep, and the whole path on real tiny models against an independent
naive computation (two plain forwards of the model, torch's KL, a rank correlation written here)."""
import math
from types import SimpleNamespace

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

import naive_reference
from conftest import image, make_policy
from ddapo.core.config import DDAPOConfig
from ddapo.core.formulas import NotApplicable
from ddapo.core.row import Row
from ddapo.core.validity import (OutputValidity, average_ranks, masked_prompt, output_validity, spearman,
                                 token_visual_dependency, undefined_metrics, validity_statistics)
from ddapo.engine.scheduler import ForwardScheduler
from ddapo.reward import DDAPOAttentionORM
from test_reward import naive_token_text_mass, rows_of
from test_scheduler import output


# ---------------------------------------------------------------------------------------------------------------
# the naive computation: written out here and in tests/naive_reference.py, sharing nothing with the product

def naive_ranks(values):
    """Average ranks by counting: ``1 + #smaller + (#equal - 1) / 2``."""
    return [1 + sum(v < x for v in values) + (sum(v == x for v in values) - 1) / 2 for x in values]


def naive_spearman(x, y):
    """Pearson's correlation of the counted ranks (torch.corrcoef); None with fewer than 3 values or a constant side."""
    if len(x) < 3 or len(set(x)) == 1 or len(set(y)) == 1:
        return None
    return float(torch.corrcoef(torch.tensor([naive_ranks(x), naive_ranks(y)], dtype=torch.float64))[0, 1])


def naive_dependency(policy, row):
    """``D_{i,t}`` (Eq. 12) from two plain forwards of the model (its own attention, no template hook, all logits):
    the encoded ``[q ; o_i]`` and the same with ``pixel_values`` zeroed; torch's ``kl_div`` at the rows ``P .. P+n-1``."""
    batch, _, labels = naive_reference.encode(policy, row)
    kwargs = {k: v for k, v in batch.items()
              if k in ('input_ids', 'attention_mask', 'pixel_values', 'image_grid_thw', 'mm_token_type_ids')}
    masked = dict(kwargs, pixel_values=torch.zeros_like(kwargs['pixel_values']))
    handles = policy.template.remove_post_encode_hook()
    policy.model.eval()
    try:
        with torch.no_grad():
            logits = policy.model(**kwargs).logits[0].float()
            masked_logits = policy.model(**masked).logits[0].float()
    finally:
        policy.model.train()
        policy.template.register_post_encode_hook(handles)
    P = next(i for i, label in enumerate(labels) if label != -100)
    n = len(naive_reference.generated_ids(row))
    log_p = torch.log_softmax(logits[P:P + n], -1)
    log_q = torch.log_softmax(masked_logits[P:P + n], -1)
    return torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction='none').sum(-1)


def naive_output(policy, row):
    """``(D_{i,t}, m^V_{i,t}, R^bal_i)`` of one row, all naive (layers: the last 8, every layer of these models)."""
    m_text, key_sets = naive_token_text_mass(policy, row)
    M_text = float(m_text.mean())
    rho_text, rho_vis = M_text / key_sets.num_text_keys, (1 - M_text) / key_sets.num_vision_keys
    return naive_dependency(policy, row), 1 - m_text, rho_vis / (rho_text + rho_vis)


def assert_matches_naive(policy, rows, validity, dependencies, metrics):
    """The reward's per-output ``D_{i,t}``, ``D_i``, within-output Spearman, and the step's ``rho_out``, ``rho_tok``
    and mean ``D`` equal the naive numbers. D: to 2e-6 nats (D is a sum over the vocabulary of float32 log-probability
    differences, and the reward's forward runs other kernels than the plain one: packed, eager rows, the last bits of
    the logits differ); the rank correlations exactly (the orders agree)."""
    naive = [naive_output(policy, row) for row in rows]
    for position, (d_tokens, m_vis, reward) in enumerate(naive):
        assert dependencies[position] == pytest.approx(d_tokens, rel=1e-3, abs=2e-6)
        assert validity[position].dependency == pytest.approx(float(d_tokens.mean()), rel=1e-3, abs=2e-6)
        assert validity[position].reward_balance == pytest.approx(reward, abs=1e-5)
        expected = naive_spearman(m_vis.tolist(), d_tokens.tolist())
        assert validity[position].spearman_token == pytest.approx(expected, abs=1e-9)
    d_outputs = [float(d.mean()) for d, _, _ in naive]
    assert metrics['ddapo/validity/n'] == len(rows)
    assert metrics['ddapo/validity/D/mean'] == pytest.approx(sum(d_outputs) / len(d_outputs), rel=1e-3, abs=2e-6)
    assert metrics['ddapo/validity/spearman_output'] == pytest.approx(
        naive_spearman([r for _, _, r in naive], d_outputs), abs=1e-9)
    within = [naive_spearman(m.tolist(), d.tolist()) for d, m, _ in naive]
    assert metrics['ddapo/validity/spearman_token'] == pytest.approx(sum(within) / len(within), abs=1e-9)


def shared_prompt_columns(policy, completions, prompts=2):
    """``len(completions)`` outputs of ``prompts`` image prompts (consecutive outputs share one), as ms-swift hands
    them to a reward: outputs of one prompt share its forward under DDAPO_ATTENTION=shared."""
    tokenizer = policy.processor.tokenizer
    per_prompt = math.ceil(len(completions) / prompts)
    columns = {'messages': [], 'images': [], 'response_token_ids': [], 'prompt_id': []}
    for i, completion in enumerate(completions):
        p = i // per_prompt
        columns['messages'].append([{'role': 'user', 'content': f'<image>Which colour is shape {p}?'},
                                    {'role': 'assistant', 'content': completion}])
        columns['images'].append([image(colour=(200, 40 * p, 30), seed=p)])
        columns['response_token_ids'].append([tokenizer.encode(completion, add_special_tokens=False)])
        columns['prompt_id'].append(f'p{p}')
    return columns


def sharpened(policy, factor=8.0, image_gain=30.0):
    """Scale every q/k projection of the language model by ``factor`` and the vision merger's last projection by
    ``image_gain``: a fresh tiny model attends almost uniformly and hardly uses the image; sharpened, outputs and
    tokens differ in attention, and the image moves the predictions more (D of about 1e-3 nats, not 1e-6)."""
    with torch.no_grad():
        merger = [m for n, m in policy.model.named_modules() if 'merger' in n and isinstance(m, torch.nn.Linear)]
        merger[-1].weight.mul_(image_gain)
        for name, module in policy.model.named_modules():
            if name.endswith(('q_proj', 'k_proj')) and 'visual' not in name:
                module.weight.mul_(factor)
    return policy


COMPLETIONS = ['The answer is red', 'It is a square, I think', 'blue', 'Think step by step. The shape is yellow',
               'red circle', 'A green triangle is drawn here']


# ---------------------------------------------------------------------------------------------------------------
# the pure functions

class TestMaskedPrompt:
    """Edge cases: image and video pixels zeroed; ids, grids and masks the same objects; no pixels: unchanged."""

    def test_masked(self):
        kwargs = {'input_ids': torch.tensor([[1, 2]]), 'image_grid_thw': torch.tensor([[1, 2, 2]]),
                  'pixel_values': torch.randn(4, 6), 'pixel_values_videos': torch.randn(2, 6), 'logits_to_keep': 3}
        masked = masked_prompt(kwargs)
        assert masked['pixel_values'].abs().sum() == 0 and masked['pixel_values_videos'].abs().sum() == 0
        assert masked['pixel_values'].shape == (4, 6) and kwargs['pixel_values'].abs().sum() > 0  # a copy
        assert all(masked[k] is kwargs[k] for k in ('input_ids', 'image_grid_thw', 'logits_to_keep'))

    def test_text_only(self):
        kwargs = {'input_ids': torch.tensor([[1, 2]])}
        assert masked_prompt(kwargs) == kwargs


class TestTokenVisualDependency:
    """Edge cases: equal distributions give 0; equals torch's kl_div; float32 inside for half logits; never negative."""

    def test_against_kl_div(self):
        logits, masked = torch.randn(5, 11), torch.randn(5, 11)
        expected = torch.nn.functional.kl_div(torch.log_softmax(masked, -1), torch.log_softmax(logits, -1),
                                              log_target=True, reduction='none').sum(-1)
        assert torch.allclose(token_visual_dependency(logits, masked), expected, atol=1e-6)
        assert (token_visual_dependency(logits, masked) >= -1e-7).all()

    def test_same_prediction(self):
        logits = torch.randn(3, 7)
        assert torch.equal(token_visual_dependency(logits, logits.clone()), torch.zeros(3))

    def test_half_logits(self):
        logits, masked = torch.randn(2, 9).half(), torch.randn(2, 9).half()
        out = token_visual_dependency(logits, masked)
        assert out.dtype == torch.float32
        assert torch.allclose(out, token_visual_dependency(logits.float(), masked.float()))


class TestAverageRanks:
    """Edge cases: ties share the mean rank; all equal; one value; empty."""

    @pytest.mark.parametrize('values', [[0.3, 0.1, 0.3, 0.2], [1, 1, 1], [5], [], [2, 1, 2, 1, 3]])
    def test_against_counting(self, values):
        assert average_ranks(values) == naive_ranks(values)


class TestSpearman:
    """Edge cases: monotone +1 / -1; ties; fewer than 3 pairs and a constant side raise NotApplicable with their
    reason; unequal lengths are a bug (ValueError)."""

    def test_monotone(self):
        assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
        assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)

    def test_against_naive(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(20):
            x = torch.randint(0, 5, (9,), generator=generator).tolist()  # ties on purpose
            y = torch.rand(9, generator=generator).tolist()
            assert spearman(x, y) == pytest.approx(naive_spearman(x, y), abs=1e-12)

    @pytest.mark.parametrize('x, y, reason', [([1, 2], [3, 4], 'fewer_than_3'), ([1, 2, 3], [5, 5, 5], 'constant'),
                                              ([7, 7, 7], [1, 2, 3], 'constant')])
    def test_undefined(self, x, y, reason):
        with pytest.raises(NotApplicable) as error:
            spearman(x, y)
        assert error.value.reason == reason

    def test_unpaired(self):
        with pytest.raises(ValueError):
            spearman([1, 2, 3], [1, 2])


class TestOutputValidity:
    """Edge cases: D_i is the mean over every token; tokens with an undefined m^V are left out of the within-output
    correlation; too few tokens or a constant side give a reason; mismatched shapes are a bug."""

    def test_values(self):
        m_vis, d = torch.tensor([0.1, float('nan'), 0.3, 0.2, 0.6]), torch.tensor([0.0, 5.0, 1.0, 0.5, 2.0])
        result = output_validity(0.4, m_vis, d)
        assert result.dependency == pytest.approx(1.7) and result.reward_balance == 0.4 and result.reason is None
        assert result.spearman_token == pytest.approx(naive_spearman([0.1, 0.3, 0.2, 0.6], [0.0, 1.0, 0.5, 2.0]))

    @pytest.mark.parametrize('m_vis, d, reason', [([0.1, 0.2], [1.0, 2.0], 'fewer_than_3'),
                                                  ([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], 'constant')])
    def test_undefined(self, m_vis, d, reason):
        result = output_validity(0.4, torch.tensor(m_vis), torch.tensor(d))
        assert result.spearman_token is None and result.token_reason == reason and result.dependency is not None

    def test_shapes(self):
        with pytest.raises(ValueError):
            output_validity(0.4, torch.tensor([0.1, 0.2]), torch.tensor([1.0]))
        with pytest.raises(ValueError):
            output_validity(0.4, torch.tensor([]), torch.tensor([]))


class TestValidityStatistics:
    """Edge cases: the outputs left out are counted, not used; rho_tok averages the defined within-output values;
    fewer than 3 outputs, constant D and no outputs leave a statistic out with its reason."""

    def test_values(self):
        outputs = [OutputValidity(0.2, 0.3, 0.5), OutputValidity(0.4, 0.1, -0.5), OutputValidity(0.5, 0.2, None, 'constant'),
                   OutputValidity(0.3, 0.4, 1.0), OutputValidity.left_out('out_of_memory')]
        stats = validity_statistics(outputs)
        assert stats.metrics['ddapo/validity/n'] == 4 and stats.metrics['ddapo/validity/D/mean'] == pytest.approx(0.25)
        assert stats.rho_out == pytest.approx(naive_spearman([0.2, 0.4, 0.5, 0.3], [0.3, 0.1, 0.2, 0.4]))
        assert stats.metrics['ddapo/validity/spearman_token'] == pytest.approx(1.0 / 3)
        assert stats.undefined == {'left_out': {'out_of_memory': 1}, 'spearman_token': {'constant': 1}}
        assert stats.points == [(0.2, 0.3), (0.4, 0.1), (0.5, 0.2), (0.3, 0.4)]

    def test_too_few_and_constant(self):
        two = validity_statistics([OutputValidity(0.2, 0.3, 0.5), OutputValidity(0.4, 0.1, 0.2)])
        assert 'ddapo/validity/spearman_output' not in two.metrics and two.rho_out is None
        assert two.undefined == {'spearman_output': {'fewer_than_3': 1}}
        flat = validity_statistics([OutputValidity(r, 0.3, 0.5) for r in (0.1, 0.2, 0.3)])
        assert flat.undefined == {'spearman_output': {'constant': 1}}

    def test_no_outputs(self):
        stats = validity_statistics([OutputValidity.left_out('reward_not_applicable')] * 2)
        assert stats.metrics == {'ddapo/validity/n': 0.0}
        assert stats.undefined == {'left_out': {'reward_not_applicable': 2}, 'D/mean': {'no_outputs': 1},
                                   'spearman_output': {'fewer_than_3': 1}, 'spearman_token': {'no_outputs': 1}}


class TestUndefinedMetrics:
    """Edge cases: left-out outputs under ddapo/validity/left_out, undefined statistics under ddapo/validity/undefined;
    nothing undefined: no metric."""

    def test_names(self):
        assert undefined_metrics({}) == {}
        assert undefined_metrics({'left_out': {'a': 2}, 'spearman_token': {'constant': 3}}) == {
            'ddapo/validity/left_out/a': 2.0, 'ddapo/validity/undefined/spearman_token/constant': 3.0}


class TestCadence:
    """The step rule of validation steps and the report (ddapo.core.cadence.Cadence). Edge cases: 0 never; N every N-th
    logged step (global_step + 1) with a call every step; calls every k steps (--steps_per_generation k, ...) land on
    every step at which an N-th step was reached since the previous call, for k = N, k > N and k < N; calls that do not
    start at 0 (a resumed run); a step called twice (gradient accumulation; the capture, then the reward) answers the
    same; the report's first step (0, not a resumed run's first call); a bad value fails at start naming the variable."""

    @staticmethod
    def due(every, steps, first=False):
        from ddapo.core.cadence import Cadence
        cadence = Cadence(every, first)
        return [s for s in steps if cadence.due(s)]

    def test_every_step(self):
        assert self.due(1, range(8)) == list(range(8))
        assert [s + 1 for s in self.due(4, range(8))] == [4, 8]
        assert self.due(0, range(8)) == []

    @pytest.mark.parametrize('every, k, expected', [(2, 2, [2, 4, 6, 8]), (2, 3, [3, 6, 9]), (3, 2, [2, 6, 8]),
                                                    (4, 4, [4, 8]), (2, 4, [4, 8])])
    def test_calls_every_k_steps(self, every, k, expected):
        steps = range(0, 10, k)
        assert self.due(every, steps) == expected
        # every N-th step of the run falls inside exactly one due call's span (p, s], p its previous call's step
        for n in range(every, steps[-1] + 1, every):
            assert sum(1 for p, s in zip(steps, steps[1:]) if s in expected and p + 1 < n <= s + 1) == 1

    def test_resumed_and_repeated(self):
        from ddapo.core.cadence import Cadence
        assert self.due(3, [5, 6, 7, 8]) == [5, 8]
        cadence = Cadence(2)
        assert [cadence.due(s) for s in (0, 0, 1, 1, 1, 2)] == [False, False, True, True, True, False]

    def test_evaluations_never_move_training(self):
        """A cadence per mode: an evaluation at step 1 does not take the training call at step 2's N-th step."""
        from ddapo.reward import DDAPOAttentionORM
        reward = DDAPOAttentionORM(config=DDAPOConfig(validate_steps=2))
        assert [reward.validating(s, mode) for s, mode in ((0, 'train'), (1, 'eval'), (2, 'train'), (2, 'train'))] \
            == [False, True, True, True]

    def test_report_first_step(self):
        assert self.due(3, [0, 2, 4, 6], first=True) == [0, 2, 6]
        assert self.due(3, [4, 6], first=True) == [6]  # a resumed run: its first call is not step 0

    def test_bad_value(self):
        with pytest.raises(ValueError, match='DDAPO_VALIDATE_STEPS'):
            DDAPOConfig.from_env({'DDAPO_VALIDATE_STEPS': '-1'})
        assert DDAPOConfig.from_env({'DDAPO_VALIDATE_STEPS': '5'}).validate_steps == 5


# ---------------------------------------------------------------------------------------------------------------
# the engine

class TestSchedulerValidation:
    """Edge cases: a validation step runs two forwards per unit, the second on the masked prompt with the logits of the
    output rows kept in both; the padding of a less busy rank doubles; the masked forward running out of memory
    leaves D undefined and says why, the reward's own run untouched; off, one forward and one logit row."""

    def run(self, validate, gather=None, masked_fails=False):
        calls = []

        def forward(**kwargs):
            calls.append(kwargs)
            if masked_fails and kwargs.get('pixel_values') is not None and not kwargs['pixel_values'].any():
                raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 9.00 GiB')
            length = kwargs['input_ids'].shape[-1]
            keep = kwargs.get('logits_to_keep', 1)
            return CausalLMOutputWithPast(logits=torch.randn(1, keep if keep else length, 7))

        one = output(0, [1, 2, 3], (5, 6))
        one.encoded.forward_kwargs['pixel_values'] = torch.ones(2, 3)
        env = SimpleNamespace(forward=forward, gather=gather or (lambda v: v), padding_encoding=None,
                              collective=gather is not None)
        scheduler = ForwardScheduler(DDAPOConfig(attention='rows'), (0, 1), hybrid=False)
        return scheduler, scheduler.run([one], env, validate=validate), calls

    def test_two_forwards(self):
        _, call, calls = self.run(True)
        assert len(calls) == 2 and calls[0]['logits_to_keep'] == calls[1]['logits_to_keep'] == 2  # rows 3 and 4
        assert calls[0]['pixel_values'].all() and not calls[1]['pixel_values'].any()
        assert torch.equal(calls[0]['input_ids'], calls[1]['input_ids'])
        # the stand-in captures nothing: the run is incomplete, so no D (the reward stops such a run)
        assert call.runs[0].dependencies == [None] and call.runs[0].validation_detail

    def test_off(self):
        _, call, calls = self.run(False)
        assert len(calls) == 1 and 'logits_to_keep' not in calls[0] and call.runs[0].dependencies is None

    def test_padding_doubles(self):
        scheduler, call, calls = self.run(True, gather=lambda mine: [3, mine[0]])
        assert call.padding == 4 and len(calls) == 2 + 4 and scheduler.last_forwards == 2

    def test_masked_out_of_memory(self):
        _, call, calls = self.run(True, masked_fails=True)
        run = call.runs[0]
        assert len(calls) == 2 and run.dependencies == [None] and not run.out_of_memory
        assert 'the validation forward on the masked prompt' in run.validation_detail
        assert 'ran out of memory' in run.validation_detail


# ---------------------------------------------------------------------------------------------------------------
# the whole path on real models

@pytest.fixture(scope='module', params=['qwen2_5_vl', 'qwen3_5'])
def sharp_policy(request, tiny_model_dir, tmp_path_factory):
    """Qwen2.5-VL and the hybrid Qwen3.5 (Gated DeltaNet layers between softmax ones), q/k sharpened x8."""
    policy = make_policy(tiny_model_dir(request.param), request.param, str(tmp_path_factory.mktemp('output')))
    policy.model_type = request.param
    yield sharpened(policy)
    policy.template.remove_post_encode_hook()


class TestValidityEqualsNaive:
    """Single process, Qwen2.5-VL and Qwen3.5: on a validation step the reward's D_{i,t}, D_i, within-output Spearman,
    rho_out, rho_tok and mean D equal two plain forwards, torch's KL and a rank correlation written here; for every
    reward path (shared packs the outputs of a prompt, masked forward included); the rewards are those of the
    same call without validation, bit for bit; numbers differ between outputs (the test could fail); D computed in
    chunks of rows."""

    @pytest.mark.parametrize('attention', ['shared', 'rows', 'eager'])
    def test_against_naive(self, sharp_policy, attention, tmp_path, monkeypatch):
        from ddapo.engine import scheduler
        monkeypatch.setattr(scheduler, 'VALIDATION_ROWS', 3)  # Eq. (12) in chunks of 3 rows: outputs span several
        sharp_policy.args.output_dir = str(tmp_path)
        columns = shared_prompt_columns(sharp_policy, COMPLETIONS)
        rows = rows_of(columns)
        plain = DDAPOAttentionORM(config=DDAPOConfig(attention=attention))(COMPLETIONS, trainer=sharp_policy, **columns)
        reward = DDAPOAttentionORM(config=DDAPOConfig(attention=attention, validate_steps=1))
        rewards = reward(COMPLETIONS, trainer=sharp_policy, **columns)
        assert rewards == plain  # validation never changes a reward
        if attention == 'shared' and sharp_policy.model_type == 'qwen2_5_vl':
            assert reward.scheduler.last_forwards == 2 * 2  # two prompts: one forward each, and its masked one
        assert_matches_naive(sharp_policy, rows, reward.last_validity, reward.last_dependencies, reward.last_metrics)
        d_outputs = [v.dependency for v in reward.last_validity.values()]
        assert min(d_outputs) > 0 and max(d_outputs) > 1.05 * min(d_outputs), d_outputs
        # the report of a validation step: the scatter and a dual-axis plot per sample
        assert (tmp_path / 'ddapo' / 'step0000001_train_validity.png').exists()
        assert (tmp_path / 'ddapo' / 'step0000001_train_sample0_dependency.png').exists()
        assert 'D per generated token (KL, image masked):' in (tmp_path / 'ddapo' / 'report.md').read_text()

    def test_not_validating_step(self, sharp_policy, tmp_path):
        """DDAPO_VALIDATE_STEPS=2 at global_step 0 (logged as step 1): one forward per output and no validity metric."""
        sharp_policy.args.output_dir = str(tmp_path)
        columns = shared_prompt_columns(sharp_policy, COMPLETIONS[:3], prompts=3)
        reward = DDAPOAttentionORM(config=DDAPOConfig(attention='rows', validate_steps=2))
        reward(COMPLETIONS[:3], trainer=sharp_policy, **columns)
        assert reward.scheduler.last_forwards == 3 and reward.last_validity == {}
        assert not any(k.startswith('ddapo/validity/') for k in reward.last_metrics)

    def test_left_out_and_undefined(self, sharp_policy, tmp_path):
        """A text-only row is left out (counted); two image outputs are too few for rho_out (counted, warned once)."""
        sharp_policy.args.output_dir = str(tmp_path)
        columns = shared_prompt_columns(sharp_policy, COMPLETIONS[:3], prompts=3)
        columns['messages'][2][0]['content'] = 'Which colour is it?'
        columns['images'][2] = []
        reward = DDAPOAttentionORM(config=DDAPOConfig(attention='rows', validate_steps=1, report=False))
        rewards = reward(COMPLETIONS[:3], trainer=sharp_policy, **columns)
        assert rewards[2] is None
        metrics = reward.last_metrics
        assert metrics['ddapo/validity/n'] == 2 and metrics['ddapo/validity/left_out/reward_not_applicable'] == 1
        assert metrics['ddapo/validity/undefined/spearman_output/fewer_than_3'] == 1
        assert 'ddapo/validity/spearman_output' not in metrics
        assert reward.validity_undefined['spearman_output/fewer_than_3'] == 1


def assert_dump_matches_naive(policy, dump_dir, ranks=(0, 1), first_rows=None):
    """The first step of a real run, dumped by every rank (tests/plugins/ddapo_test_hooks.py), against the naive
    numbers of the same rows in this process: each scored row's D_{i,t}, D_i and within-output Spearman; and the
    step's rho_out, rho_tok and mean D over every rank's rows (the gathered statistics, the same on every rank)."""
    from test_deepspeed import dumped_rows
    rows, validity, dependencies, metrics = [], {}, {}, []
    for rank in ranks:
        dumped = dumped_rows(dump_dir, rank)
        first = dumped[:first_rows] if first_rows else [d for d in dumped if d['validity_metrics'] ==
                                                        dumped[0]['validity_metrics']]
        metrics.append(first[0]['validity_metrics'])
        for d in first:
            if d['reward'] is None:
                assert d['validity']['reason'] == 'reward_not_applicable'
                continue
            validity[len(rows)] = OutputValidity(**d['validity'])
            dependencies[len(rows)] = torch.tensor(d['dependency'])
            rows.append(Row({'messages': d['messages'], 'images': d['images'],
                             'response_token_ids': d['response_token_ids']}))
    assert all(m == metrics[0] for m in metrics), metrics  # gathered: every rank logs the same statistics
    assert len(rows) >= 3 and metrics[0]['ddapo/validity/n'] == len(rows), (len(rows), metrics[0])
    assert_matches_naive(policy, rows, validity, dependencies, metrics[0])


@pytest.mark.slow
class TestTwoRanks:
    """Two ranks (NPROC_PER_NODE=2, DeepSpeed ZeRO-2 on CPU over gloo: tests/cpu_distributed), Qwen2.5-VL and the hybrid
    Qwen3.5, image prompts, DDAPO_VALIDATE_STEPS=1, one step (the rewards before any update): every rank's D_{i,t},
    D_i and within-output Spearman, and the gathered rho_out, rho_tok and mean D (8 outputs, 4 per rank), equal the
    naive computation of all rows in one process."""

    @pytest.mark.parametrize('model_type, port', [('qwen2_5_vl', 29561), ('qwen3_5', 29563)])
    def test_two_ranks(self, model_type, port, tiny_model_dir, shapes_dataset, tmp_path):
        from test_swift_rlhf_e2e import swift_rlhf
        model_dir = tiny_model_dir(model_type)
        result = swift_rlhf(model_dir, shapes_dataset, str(tmp_path), '--max_steps', '1', '--deepspeed', 'zero2',
                            '--fp16', 'false', '--bf16', 'false', model_type=model_type,
                            env_extra={'NPROC_PER_NODE': '2', 'MASTER_PORT': str(port), 'DS_ACCELERATOR': 'cpu',
                                       'DDAPO_VALIDATE_STEPS': '1', 'TEST_DDAPO_DUMP_DIR': 'dump'})
        assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
        policy = make_policy(model_dir, model_type, str(tmp_path / 'one_process'))
        try:
            assert_dump_matches_naive(policy, str(tmp_path / 'dump'))
        finally:
            policy.template.remove_post_encode_hook()


@pytest.mark.slow
class TestValidityDemo:
    """examples/train/grpo/validity_demo.py on 4 questions x 3 samples: it warm-starts the demo model, samples, scores
    with validation on, and writes every number for both models; the warm-started model's predictions depend on the
    image far more than the random-weight control's (the script's comparison can show an effect), and its answers are
    found in the completions."""

    def test_script(self, tmp_path):
        import json
        import subprocess
        import sys
        from conftest import GRPO_DIR
        out = tmp_path / 'validity.json'
        subprocess.run([sys.executable, f'{GRPO_DIR}/validity_demo.py', '--output-dir', str(tmp_path), '--questions',
                        '4', '--samples', '3', '--prompts-per-step', '2', '--json', str(out)], check=True,
                       capture_output=True, timeout=900)
        results = json.loads(out.read_text())['results']
        warm, control = results['warm-started'], results['before the warm start (control)']
        assert warm['outputs'] == control['outputs'] == 12
        for result in (warm, control):
            assert -1 <= result['rho_out pooled'] <= 1 and 0 < result['rho_out pooled, permutation p'] <= 1
            assert result['rho_tok']['n'] > 0 and result['D']['n'] == 12
        assert warm['D']['mean'] > 100 * control['D']['mean'], (warm['D'], control['D'])
        assert warm['outputs with an answer'] > 0 and warm['D on the rows choosing the answer tokens']['n'] > 0
