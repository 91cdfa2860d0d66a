"""Reliability on real tiny models: bad samples give None with a counted reason (and still their forward),
DDAPO_STRICT raises, an out-of-memory forward is survived, videos work, and a reward call leaves no trace."""
from unittest import mock

import pytest
import torch

from ddapo import reward as reward_module
from conftest import image, make_policy
from ddapo.reward import DDAPOAttentionORM
from ddapo.core.config import DDAPOConfig
from ddapo.ms_swift.encoding import encode_completion
from test_reward import COMPLETIONS, naive_reward, reward_kwargs, rows_of


def count_forwards(policy):
    calls = []
    handle = policy.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


class TestBadSamples:
    """Edge cases, each None with its reason, one forward per row all the same, one warning per reason:
    empty completion, only special tokens, text-only prompt, non-finite attention, out of memory."""

    def test_reasons_and_forwards(self, qwen25):
        tokenizer = qwen25.processor.tokenizer
        columns = reward_kwargs(qwen25, ['The answer is red', '', 'x', 'red', 'blue'], text_only_rows=(3,))
        columns['response_token_ids'][1] = [[]]  # the model stopped at once
        columns['response_token_ids'][2] = [[tokenizer.convert_tokens_to_ids('<|im_end|>')]]
        orm = DDAPOAttentionORM(config=DDAPOConfig(self_check=False))  # the path's forwards, not the check's
        calls, handle = count_forwards(qwen25)
        try:
            with mock.patch.object(reward_module.logger, 'warning') as warning:
                rewards = orm(['The answer is red', '', 'x', 'red', 'blue'], **columns)
                orm(['', ''], **{k: v[1:3] if isinstance(v, list) else v for k, v in columns.items()})
        finally:
            handle.remove()
        assert rewards[0] is not None and rewards[4] is not None
        assert rewards[1:4] == [None, None, None]
        assert orm.not_applicable == {'empty_completion': 2, 'only_special_tokens': 2, 'no_vision_keys': 1}
        assert len(calls) == 5 + 2, 'every row runs its forward, scorable or not'
        reasons = [c.args[0] for c in warning.call_args_list if c.args[0].startswith('[DDAPO] reward is None')]
        assert len(reasons) == 3, f'one warning per reason, not per sample: {reasons}'
        assert orm.last_metrics['ddapo/not_applicable/only_special_tokens_frac'] == pytest.approx(0.5)

    def test_non_finite_attention(self, qwen25):
        layer = qwen25.model.model.language_model.layers[0]
        handle = layer.register_forward_hook(lambda module, args, output: output * float('nan'))
        try:
            orm = DDAPOAttentionORM()
            assert orm(COMPLETIONS[:1], **reward_kwargs(qwen25, COMPLETIONS[:1])) == [None]
        finally:
            handle.remove()
        assert orm.not_applicable == {'non_finite_attention': 1}

    def test_out_of_memory_is_survived(self, qwen25):
        layer = qwen25.model.model.language_model.layers[2]
        calls = []

        def oom_once(module, args, kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')

        handle = layer.register_forward_pre_hook(oom_once, with_kwargs=True)
        try:
            orm = DDAPOAttentionORM()
            rewards = orm(COMPLETIONS[:2], **reward_kwargs(qwen25, COMPLETIONS[:2]))
        finally:
            handle.remove()
        assert rewards[0] is None and rewards[1] is not None
        assert orm.not_applicable == {'out_of_memory': 1}
        assert qwen25.model.config.text_config._attn_implementation == 'sdpa' and qwen25.model.training

    def test_strict_raises(self, qwen25):
        with pytest.raises(RuntimeError, match=r'DDAPO_STRICT=1.*no_vision_keys'):
            DDAPOAttentionORM(config=DDAPOConfig(strict=True))(
                COMPLETIONS[:1], **reward_kwargs(qwen25, COMPLETIONS[:1], text_only_rows=(0,)))
        assert qwen25.model.config.text_config._attn_implementation == 'sdpa'


class TestPaddingFreeTemplate:
    """A padding-free trainer (--padding_free true, which ms-swift allows with flash attention only) leaves its
    template packing; the reward encodes one unpacked sequence, equals the naive computation, and gives the
    template back packing."""

    def test_padding_free(self, qwen25):
        qwen25.template.padding_free = True
        try:
            columns = reward_kwargs(qwen25, COMPLETIONS[:2])
            rewards = DDAPOAttentionORM()(COMPLETIONS[:2], **columns)
            assert qwen25.template.padding_free is True
            qwen25.template.padding_free = False
            assert rewards == pytest.approx([naive_reward(qwen25, row) for row in rows_of(columns)], abs=1e-5)
        finally:
            qwen25.template.padding_free = False


def video_frames(tmp_path, count=4):
    paths = []
    for i in range(count):
        path = tmp_path / f'frame{i}.png'
        image(colour=(200, 40 * i, 40), seed=i).save(path)
        paths.append(str(path))
    return paths


class TestVideoPrompt:
    """A video prompt (frames generated here): its tokens are vision keys, and the reward equals the naive
    computation, on every family."""

    def test_video(self, policy, tmp_path):
        columns = reward_kwargs(policy, COMPLETIONS[:2])
        columns['messages'] = [[{'role': 'user', 'content': '<video>What happens?'},
                                {'role': 'assistant', 'content': c}] for c in COMPLETIONS[:2]]
        columns['images'] = [[], []]
        columns['videos'] = [[video_frames(tmp_path)], [video_frames(tmp_path, 6)]]
        rewards = DDAPOAttentionORM()(COMPLETIONS[:2], **columns)
        expected = [naive_reward(policy, row) for row in rows_of(columns)]
        assert rewards == pytest.approx(expected, abs=1e-5) and all(0 < r < 1 for r in rewards)
        encoded = encode_completion(policy, rows_of(columns)[0])
        config = policy.model.config
        assert config.video_token_id in encoded.input_ids[:encoded.prompt_len]
        assert config.image_token_id not in encoded.input_ids


def training_step(policy, kwargs, seed):
    """One training forward and backward through ms-swift's hook; logits and gradients."""
    policy.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = policy.model(**kwargs).logits
    (logits.float() ** 2).mean().backward()
    return logits.detach().clone(), {n: p.grad.clone() for n, p in policy.model.named_parameters()
                                     if p.grad is not None}


class TestNoTrace:
    """After a reward call the next training forward gives bit-identical logits and gradients to one without
    it, with dropout on (RNG), gradient checkpointing on, and the template in GRPO mode."""

    def test_bit_identical(self, tiny_model_dir, tmp_path):
        policy = make_policy(tiny_model_dir('qwen2_5_vl'), 'qwen2_5_vl', str(tmp_path), gradient_checkpointing=True)
        try:
            policy.model.config.text_config.attention_dropout = 0.1
            for module in policy.model.modules():
                if hasattr(module, 'attention_dropout'):
                    module.attention_dropout = 0.1
            row = rows_of(reward_kwargs(policy, COMPLETIONS[:1]))[0]
            kwargs = dict(encode_completion(policy, row).forward_kwargs)
            kwargs.pop('logits_to_keep')
            logits_a, grads_a = training_step(policy, kwargs, seed=3)
            logits_b, _ = training_step(policy, kwargs, seed=4)
            assert not torch.equal(logits_a, logits_b), 'dropout must be active for this test to mean anything'
            torch.manual_seed(3)
            DDAPOAttentionORM()(COMPLETIONS[:2], **reward_kwargs(policy, COMPLETIONS[:2]))
            policy.model.zero_grad(set_to_none=True)
            logits_c = policy.model(**kwargs).logits  # seed 3 was set before the reward call
            (logits_c.float() ** 2).mean().backward()
            grads_c = {n: p.grad for n, p in policy.model.named_parameters() if p.grad is not None}
            assert torch.equal(logits_a, logits_c.detach())
            assert grads_a.keys() == grads_c.keys() and all(torch.equal(grads_a[n], grads_c[n]) for n in grads_a)
            assert policy.model.is_gradient_checkpointing and torch.is_grad_enabled()
        finally:
            policy.template.remove_post_encode_hook()
