"""DDAPOAttentionORM on real tiny models and ms-swift's template: capture vs the naive computation,
state restoration, and the failures that must happen at start."""
from types import SimpleNamespace

import pytest
import torch

import naive_reference
from conftest import MODEL_TYPES, image, make_policy
from ddapo.core.row import Row
from ddapo.reward import DDAPOAttentionORM
from ddapo.core.config import DDAPOConfig
from ddapo.core.formulas import layer_set
from ddapo.ms_swift.encoding import TEMPLATE_MODE
from ddapo.ms_swift.model_spec import model_spec

COMPLETIONS = ['The answer is red', 'It is a square, I think', 'blue', 'Think step by step. The shape is yellow']


def reward_kwargs(policy, completions=COMPLETIONS, images_per_row=1, text_only_rows=()):
    """The columns ms-swift hands a reward function (rows as after rollout), plus the trainer."""
    tokenizer = policy.processor.tokenizer
    columns = {'messages': [], 'images': [], 'response_token_ids': [], 'prompt_id': [], 'trainer': policy}
    completions = list(completions)
    for i, completion in enumerate(completions):
        n_images = 0 if i in text_only_rows else images_per_row
        columns['messages'].append([{'role': 'user', 'content': '<image>' * n_images + 'What colour is the shape?'},
                                    {'role': 'assistant', 'content': completion}])
        columns['images'].append([image(colour=(40 * i, 200, 90), seed=i + j) for j in range(n_images)])
        columns['response_token_ids'].append([tokenizer.encode(completion, add_special_tokens=False)])
        columns['prompt_id'].append(f'p{i}')
    return columns


def naive_reward(policy, row, num_layers_read=8, layers=None):
    """Eq. (1)-(7) written out from `output_attentions=True` of the unwrapped eager model, with the suite's own key sets
    and system turn (tests/naive_reference.py: nothing of the product)."""
    return naive_reference.balance_reward(policy, row, num_layers_read, layers)


def naive_token_text_mass(policy, row, num_layers_read=8, layers=None):
    """``m^T_{i,t}`` (Eq. 1 + 4) from `output_attentions=True`, and the key sets (tests/naive_reference.py).
    ``layers``: positions in the attention layers L_att, which is what eager returns attentions for (Qwen3.5: its
    softmax layers only)."""
    return naive_reference.token_text_mass(policy, row, num_layers_read, layers)


def rows_of(columns):
    n = len(columns['messages'])
    return [Row({k: v[i] for k, v in columns.items() if k != 'trainer'}) for i in range(n)]


class TestRewardEqualsNaiveComputation:
    """The capture (inside the attention function, through ms-swift's hook) equals the naive computation
    from output_attentions=True, sample by sample, fp32, 1e-5; samples differ from each other."""

    def test_sample_by_sample(self, policy):
        columns = reward_kwargs(policy)
        rewards = DDAPOAttentionORM()(COMPLETIONS, **columns)
        expected = [naive_reward(policy, row) for row in rows_of(columns)]
        assert rewards == pytest.approx(expected, abs=1e-5)
        assert all(0.0 <= r <= 1.0 for r in rewards)
        assert max(rewards) - min(rewards) > 1e-3, 'rewards should differ between samples'

    def test_two_images(self, policy):
        columns = reward_kwargs(policy, COMPLETIONS[:2], images_per_row=2)
        rewards = DDAPOAttentionORM()(COMPLETIONS[:2], **columns)
        assert rewards == pytest.approx([naive_reward(policy, row) for row in rows_of(columns)], abs=1e-5)


class TestNotApplicable:
    """A text-only prompt gives None, counted by reason; other rows in the call are still scored."""

    def test_text_only_row(self, policy):
        orm = DDAPOAttentionORM()
        rewards = orm(COMPLETIONS[:3], **reward_kwargs(policy, COMPLETIONS[:3], text_only_rows=(1,)))
        assert rewards[1] is None and rewards[0] is not None and rewards[2] is not None
        assert orm.not_applicable == {'no_vision_keys': 1}
        metrics = orm.last_metrics
        assert metrics['ddapo/not_applicable_frac'] == pytest.approx(1 / 3)
        assert metrics['ddapo/num_vision_keys/mean'] > 0 and 0 <= metrics['ddapo/M_V/mean'] <= 1
        assert {f'ddapo/{s}/M_V/mean' for s in ('all', 'early', 'middle', 'late')} <= set(metrics)


def policy_state(policy):
    model, config = policy.model, policy.model.config
    keys = ('_attn_implementation', 'attn_implementation', 'llm_attn_implementation')
    return {
        'attention': [(label, k, getattr(cfg, k)) for label, cfg in (('config', config), ('text', config.text_config),
                                                                     ('vision', config.vision_config))
                      for k in keys if hasattr(cfg, k)],
        'training': [m.training for m in model.modules()],
        'gradient_checkpointing': model.is_gradient_checkpointing,
        'template': (policy.template.mode, policy.template.max_length, policy.template.padding_free),
        'grad_enabled': torch.is_grad_enabled(),
    }


class TestStateRestored:
    """Model modes (per module, a frozen eval-mode submodule included), attention keys, gradient
    checkpointing and template state are as before, after a normal call and after a forward that raises; on every
    family (the forward that raises is stopped in an attention layer of L_att)."""

    @pytest.fixture(params=MODEL_TYPES)
    def checkpointed_policy(self, request, tiny_model_dir, tmp_path):
        policy = make_policy(tiny_model_dir(request.param), request.param, str(tmp_path), gradient_checkpointing=True)
        policy.model.visual.eval()  # a submodule whose mode differs from the model's
        policy.template.max_length = 4096
        policy.template.set_mode('rlhf')
        yield policy
        policy.template.remove_post_encode_hook()

    def test_after_normal_call(self, checkpointed_policy):
        before = policy_state(checkpointed_policy)
        assert before['gradient_checkpointing'] and before['template'][0] != TEMPLATE_MODE
        DDAPOAttentionORM()(COMPLETIONS[:1], **reward_kwargs(checkpointed_policy, COMPLETIONS[:1]))
        assert policy_state(checkpointed_policy) == before

    def test_after_forward_that_raises(self, checkpointed_policy):
        before = policy_state(checkpointed_policy)
        layer = checkpointed_policy.model.model.language_model.layers[model_spec(checkpointed_policy).attention_layers[-1]]

        def explode(module, args, kwargs):
            assert checkpointed_policy.model.config.text_config._attn_implementation == 'ddapo_rows'
            assert not checkpointed_policy.model.training and not torch.is_grad_enabled()
            raise RuntimeError('boom')

        handle = layer.register_forward_pre_hook(explode, with_kwargs=True)
        try:
            with pytest.raises(RuntimeError, match='boom'):
                DDAPOAttentionORM()(COMPLETIONS[:1], **reward_kwargs(checkpointed_policy, COMPLETIONS[:1]))
        finally:
            handle.remove()
        assert policy_state(checkpointed_policy) == before


class TestFailsClearly:
    """Misconfigurations fail at construction or first call, naming the fix."""

    def test_missing_trainer(self, policy):
        columns = reward_kwargs(policy, COMPLETIONS[:1])
        del columns['trainer']
        with pytest.raises(RuntimeError, match='plugin.py'):
            DDAPOAttentionORM()(COMPLETIONS[:1], **columns)

    def test_model_without_vision_tokens(self, policy):
        from transformers import Qwen2Config, Qwen2ForCausalLM
        text_model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  num_key_value_heads=1))
        trainer = SimpleNamespace(model=text_model, template=policy.template, accelerator=policy.accelerator)
        with pytest.raises(ValueError, match='no image_token_id or video_token_id'):
            DDAPOAttentionORM().on_trainer_init(trainer)

    def test_unsupported_family(self, policy, monkeypatch):
        from ddapo.ms_swift import compat, model_spec
        assert set(compat.SUPPORTED_MODEL_TYPES) == set(MODEL_TYPES) | {'internvl', 'glm4v', 'glm4v_moe', 'gemma3'}
        monkeypatch.setattr(model_spec, 'SUPPORTED_MODEL_TYPES', ('gemma3', 'glm4v'))
        with pytest.raises(ValueError, match=f"supports the model families gemma3, glm4v; .*model_type='{policy.model_type}'"):
            DDAPOAttentionORM().on_trainer_init(policy)

    @pytest.mark.parametrize('kind', ['linear_attention', 'sliding_attention'])
    def test_no_attention_layer(self, policy, monkeypatch, kind):
        """No full-attention layer (all linear, or all sliding-window: neither is in L_att): refused at start."""
        text_config = policy.model.config.text_config
        monkeypatch.setattr(text_config, 'layer_types', [kind] * text_config.num_hidden_layers, raising=False)
        with pytest.raises(ValueError, match=f"has none \\(layer types \\['{kind}'\\]; L_att is the layers of type "
                                             "'full_attention'\\)"):
            DDAPOAttentionORM().on_trainer_init(policy)

    def test_unknown_setting(self, monkeypatch):
        monkeypatch.setenv('DDAPO_DEBGU', '1')
        with pytest.raises(ValueError, match='DDAPO_DEBGU'):
            DDAPOAttentionORM()


class TestVariants:
    """DDAPO_LAYERS and DDAPO_REWARD through the ORM: a layer third equals the naive computation on those layers;
    group equals Eq. (8) over the balance scores; gated uses a registered reward's verdict."""

    def test_layers(self, policy):
        late = layer_set(len(model_spec(policy).attention_layers), 'late')
        assert late == ([2] if policy.model_type.startswith('qwen3_5') else [2, 3])  # Qwen3.5: decoder layer 5
        columns = reward_kwargs(policy, COMPLETIONS[:2])
        rewards = DDAPOAttentionORM(config=DDAPOConfig(layers='late'))(COMPLETIONS[:2], **columns)
        assert rewards == pytest.approx([naive_reward(policy, row, layers=late) for row in rows_of(columns)],
                                        abs=1e-5)
        assert rewards != pytest.approx([naive_reward(policy, row) for row in rows_of(columns)], abs=1e-5)

    # Eq. (8) / (9) act on the R^bal values, whatever the family: one standard and one hybrid family (suite time)
    @pytest.mark.parametrize('policy', ['qwen2_5_vl', 'qwen3_5'], indirect=True)
    def test_group_and_gated(self, policy, monkeypatch):
        from swift.rewards import orms

        from ddapo.answer_match import AnswerMatchORM
        monkeypatch.setitem(orms, 'answer_match', AnswerMatchORM)  # as plugin.py does, without applying its patch
        completions = ['<answer>red</answer>', 'blue', '<answer>red</answer> sure', 'red?', 'no']
        columns = reward_kwargs(policy, completions, text_only_rows=(4,))
        columns['prompt_id'] = ['p', 'p', 'p', 'q', 'q']
        columns['solution'] = ['red'] * 5
        balance = DDAPOAttentionORM()(completions, **columns)
        # Eq. (8) and (9) as the suite writes them (tests/naive_reference.py), from the balance rewards
        expected_group = naive_reference.group_rewards(balance, columns['prompt_id'])
        group = DDAPOAttentionORM(config=DDAPOConfig(reward='group'))(completions, **columns)
        assert group == pytest.approx(expected_group, abs=1e-6)
        assert group[3] == 0.0 and group[4] is None  # q has one valid output; the text-only row stays None
        monkeypatch.setenv('DDAPO_REWARD', 'gated')  # the environment, the way in from swift rlhf
        monkeypatch.setenv('DDAPO_GATE_REWARD', 'answer_match')
        gated = DDAPOAttentionORM()(completions, **columns)
        assert gated == pytest.approx(naive_reference.gated_rewards(expected_group, [True, False, True, True, False],
                                                                    columns['prompt_id']), abs=1e-6)
        assert gated[1] == 0.0 and gated[0] == pytest.approx(expected_group[0], abs=1e-6)

    def test_unknown_gate_reward(self, monkeypatch):
        monkeypatch.setenv('DDAPO_REWARD', 'gated')
        monkeypatch.setenv('DDAPO_GATE_REWARD', 'acuracy')
        with pytest.raises(ValueError, match="DDAPO_GATE_REWARD='acuracy' is not a registered reward"):
            DDAPOAttentionORM()
        with pytest.raises(ValueError, match="DDAPO_GATE_REWARD='acuracy' is not a registered reward"):
            DDAPOAttentionORM(config=DDAPOConfig(reward='gated', gate_reward='acuracy'))  # the env is not read

    def test_config_passed_in_is_validated(self, monkeypatch):
        monkeypatch.setenv('DDAPO_DEBGU', '1')  # not read when a config is passed in
        assert DDAPOAttentionORM(config=DDAPOConfig(reward='group')).config.reward == 'group'
        with pytest.raises(ValueError, match="reward='grp' is not a reward variant"):
            DDAPOAttentionORM(config=DDAPOConfig(reward='grp'))


@pytest.fixture()
def token_weights_on(policy, monkeypatch):
    """DDAPO_TOKEN_WEIGHTS=1 and the token-weights patch applied as plugin.py does; afterwards, passed or failed, the
    GRPO trainer's method is the one before and the policy has no token-weight store."""
    from swift.rlhf_trainers.grpo_trainer import GRPOTrainer

    from swift_patches import grpo_token_weights
    monkeypatch.setattr(GRPOTrainer, '_postprocess_batch', GRPOTrainer._postprocess_batch)  # restored afterwards
    grpo_token_weights.apply()
    monkeypatch.setenv('DDAPO_TOKEN_WEIGHTS', '1')
    yield
    if getattr(policy, grpo_token_weights.STORE, None) is not None:
        delattr(policy, grpo_token_weights.STORE)


def weighted_kwargs(policy, completions, **kwargs):
    columns = reward_kwargs(policy, completions, **kwargs)
    columns['request_id'] = [f'req{i}' for i in range(len(completions))]
    return columns


class TestTokenWeights:
    """DDAPO_TOKEN_WEIGHTS=1 through the ORM: each output's w_{i,t} (Eq. 10 on the naive m^T) goes to the trainer by
    request_id, a text-only row gets none, the step logs ddapo/token_weight/*, the report shows them. Edge cases:
    the rewards are unchanged, generated turns the row's messages cannot hold give None and no weights, and
    the misconfigurations fail at start: patch missing, a loss without per-token advantages, sequence parallelism,
    rows without request_id."""

    def test_weights_handed_over(self, policy, token_weights_on, monkeypatch, tmp_path):
        from ddapo.core.token_weights import token_weights
        from ddapo.ms_swift.trainer_io import token_weight_store
        monkeypatch.setattr(policy.args, 'output_dir', str(tmp_path))
        columns = weighted_kwargs(policy, COMPLETIONS[:3], text_only_rows=(1,))
        orm = DDAPOAttentionORM()
        rewards = orm(COMPLETIONS[:3], **columns)
        store = token_weight_store(policy)
        assert set(store) == {'req0', 'req2'}  # the text-only row's reward is None: no weights
        for i in (0, 2):
            m_text, ks = naive_token_text_mass(policy, rows_of(columns)[i])
            expected = token_weights(m_text, ks.num_text_keys, ks.num_vision_keys)
            assert store[f'req{i}'] == pytest.approx(expected.tolist(), abs=1e-5)
            assert len(store[f'req{i}']) == len(columns['response_token_ids'][i][0])
            assert store[f'req{i}'][0] == 1.0 and max(store[f'req{i}']) > 1.0  # sharp attention: not all 1
        assert rewards == pytest.approx([naive_reward(policy, rows_of(columns)[0]), None,
                                         naive_reward(policy, rows_of(columns)[2])], abs=1e-5)
        metrics = orm.last_metrics
        everything = store['req0'] + store['req2']
        assert metrics['ddapo/token_weight/mean'] == pytest.approx(sum(everything) / len(everything))
        assert metrics['ddapo/token_weight/min'] == pytest.approx(min(everything))
        assert metrics['ddapo/token_weight/max'] == pytest.approx(max(everything))
        assert 'advantage weight w per generated token' in (tmp_path / 'ddapo' / 'report.md').read_text()

    def test_turns_without_messages(self, policy, token_weights_on):
        """Two generated turns for a row with one assistant message: the encoding cannot hold the first turn, so the
        row gets None (generated_ids_mismatch) and no weights; the one-turn row keeps both. (Trajectories that fit
        their messages: test_multi_turn.)"""
        from ddapo.ms_swift.trainer_io import token_weight_store
        columns = reward_kwargs(policy, COMPLETIONS[:2])
        columns['request_id'] = ['one-turn', 'two-turns']
        columns['response_token_ids'][1] = [[5, 6]] + columns['response_token_ids'][1]
        orm = DDAPOAttentionORM()
        rewards = orm(COMPLETIONS[:2], **columns)
        assert rewards[0] is not None and rewards[1] is None
        assert set(token_weight_store(policy)) == {'one-turn'}
        assert orm.not_applicable == {'generated_ids_mismatch': 1}

    def test_patch_missing(self, policy, token_weights_on, monkeypatch):
        from swift_patches import grpo_token_weights
        monkeypatch.setattr(grpo_token_weights, 'is_applied', lambda: False)
        with pytest.raises(RuntimeError, match='ms_swift_4.6_grpo_token_weights.diff'):
            DDAPOAttentionORM().on_trainer_init(policy)

    @pytest.mark.parametrize('setting, message', [
        (('trainer', 'loss_type', 'real'), '--loss_type real'),
        (('args', 'use_liger_kernel', True), '--use_liger_kernel true'),
        (('template', 'sequence_parallel_size', 2), '--sequence_parallel_size > 1'),
    ])
    def test_unsupported_runs(self, policy, token_weights_on, monkeypatch, setting, message):
        owner, name, value = setting
        monkeypatch.setattr(policy if owner == 'trainer' else getattr(policy, owner), name, value, raising=False)
        with pytest.raises(ValueError, match=message):
            DDAPOAttentionORM().on_trainer_init(policy)

    def test_rows_without_request_id(self, policy, token_weights_on):
        columns = reward_kwargs(policy, COMPLETIONS[:1])
        with pytest.raises(RuntimeError, match='request_id'):
            DDAPOAttentionORM()(COMPLETIONS[:1], **columns)


class TestReport:
    """The report through the ORM: the section is numbered as logging.jsonl numbers the step (global_step + 1 while the
    rewards are computed), each sample names its prompt and its place in the group, and shows the question, the
    image, the solution and the decoded completion; the heat map is in fair shares: its cells sum to
    (|T| + |V|) * M^V, since the per-key attention on V sums to M^V."""

    def test_report(self, policy, monkeypatch, tmp_path):
        monkeypatch.setattr(policy.args, 'output_dir', str(tmp_path))
        monkeypatch.setattr(policy, 'state', SimpleNamespace(global_step=4), raising=False)
        columns = reward_kwargs(policy, COMPLETIONS[:2])
        columns['prompt_id'] = ['prompt-one', 'prompt-one']
        columns['solution'] = ['red', 'red']
        from ddapo import step_log
        written = []
        original = step_log.ReportWriter.write_step
        monkeypatch.setattr(step_log.ReportWriter, 'write_step',
                            lambda self, step, mode, metrics, samples, note='', validity=None:
                            written.extend(samples) or original(self, step, mode, metrics, samples, note, validity))
        DDAPOAttentionORM()(COMPLETIONS[:2], **columns)
        sample = written[0]
        keys = round(sample.vision_share ** -1 * sum(h.size for h in sample.heatmaps))  # |T| + |V|
        assert sum(float(h.sum()) for h in sample.heatmaps) == pytest.approx(keys * sum(sample.m_vis) / len(sample.m_vis),
                                                                           rel=1e-4)
        text = (tmp_path / 'ddapo' / 'report.md').read_text()
        assert '## step 5 (train)' in text and '## step 4' not in text
        assert '### sample 1: prompt prompt-o, output 1 of 2' in text and 'sample 2: prompt prompt-o, output 2 of 2' in text
        assert '- question: `<image>What colour is the shape?`' in text and '- solution: `red`' in text
        assert f'- completion: `{COMPLETIONS[0]}`' in text and '- images: `<in memory>`' in text
