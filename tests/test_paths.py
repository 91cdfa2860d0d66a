"""The fast reward paths equal the eager reference: `eager_rows` against ``eager_attention_forward``,
`tree_mask` / `pack_shared_prompt` on their own, and the ORM's three paths sample by sample on real tiny
models through ms-swift's template (fp32, 1e-5)."""
import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

from conftest import image
from ddapo.reward import DDAPOAttentionORM
from ddapo.engine.capture import eager_rows
from ddapo.core.config import DDAPOConfig
from ddapo.core.packing import Member, pack_shared_prompt, shared_prompt_units, shares_prompt, tree_mask
from ddapo.ms_swift.model_spec import model_spec
from test_reward import naive_reward, reward_kwargs, rows_of


class _Module(torch.nn.Module):
    """What the attention functions read of an attention module."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.layer_idx = groups, 0
        self.eval()


class TestEagerRows:
    """Edge cases: no mask (sdpa's plain causal), boolean 4D mask, additive float 4D mask (eager's own), grouped
    key/value heads, a cache offset (queries shorter than keys), bf16 (the cast back to the query dtype)."""

    def _qkv(self, dtype=torch.float32, q_len=7, k_len=7, heads=4, kv_heads=2):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, heads, q_len, 8, generator=g).to(dtype)
        k = torch.randn(2, kv_heads, k_len, 8, generator=g).to(dtype)
        return q, k, _Module(heads // kv_heads)

    @staticmethod
    def _causal(q_len, k_len, dtype):
        offset = k_len - q_len
        allowed = torch.arange(k_len)[None, :] <= (torch.arange(q_len) + offset)[:, None]
        additive = torch.zeros(q_len, k_len, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return allowed[None, None].expand(2, 1, -1, -1), additive[None, None].expand(2, 1, -1, -1)

    @pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize('mask_kind', ['none', 'bool', 'float'])
    @pytest.mark.parametrize('k_len', [7, 10])
    def test_equals_eager(self, dtype, mask_kind, k_len):
        q, k, module = self._qkv(dtype, k_len=k_len)
        boolean, additive = self._causal(7, k_len, dtype)
        _, reference = eager_attention_forward(module, q, k, k, additive, scaling=0.3)
        mask = {'none': None, 'bool': boolean, 'float': additive}[mask_kind]
        rows = slice(2, 6)
        got = eager_rows(q, k, mask, batch_index=1, rows=rows, scaling=0.3, groups=module.num_key_value_groups)
        assert got.dtype == dtype
        expected = reference[1, :, rows]
        width = got.shape[-1]  # without a mask, keys after the last row (masked for all rows) are left out
        assert width == (k_len if mask_kind != 'none' else 6 + k_len - 7)
        if width < k_len:  # the keys left out drew no attention in the reference
            assert expected[..., width:].abs().max() == 0
        torch.testing.assert_close(got, expected[..., :width], rtol=0, atol=1e-6 if dtype == torch.float32 else 4e-3)

    def test_mask_is_applied(self):
        q, k, module = self._qkv()
        got = eager_rows(q, k, None, batch_index=0, rows=slice(0, 4), scaling=1.0, groups=module.num_key_value_groups)
        assert got.shape[-1] == 4  # keys 4.. are after every row
        assert got[0, 0, 1:].abs().max() == 0 and got[0, 0, 0] == 1 and got[:, 2, 3:].abs().max() == 0


class TestTreeMask:
    """Edge cases: the docstring example, one output (plain causal), an empty output."""

    def test_example(self):
        mask = tree_mask(2, [1, 2])[0, 0]
        assert mask[2].nonzero().flatten().tolist() == [0, 1, 2]
        assert mask[4].nonzero().flatten().tolist() == [0, 1, 3, 4]
        assert mask[1].nonzero().flatten().tolist() == [0, 1]

    def test_one_output_is_causal(self):
        assert torch.equal(tree_mask(3, [4])[0, 0], torch.ones(7, 7, dtype=torch.bool).tril())

    def test_empty_output(self):
        assert torch.equal(tree_mask(2, [0, 1]), tree_mask(2, [1]))


def _kwargs(ids, prompt_len, pixels=1.0):
    n = len(ids)
    position = torch.arange(n)
    return {'input_ids': torch.tensor([ids]), 'attention_mask': torch.ones(1, n, dtype=torch.long),
            'position_ids': torch.stack([position, position + 100, position + 200])[:, None],
            'mm_token_type_ids': (torch.tensor([ids]) == 9).long(), 'pixel_values': torch.full((4, 3), pixels),
            'image_grid_thw': torch.tensor([[1, 2, 2]]), 'cu_seq_lens_q': torch.tensor([0, n]), 'logits_to_keep': 1}


class TestPackSharedPrompt:
    """Edge cases: position ids of each output from its own sequence, the prompt's own tensors kept once,
    varlen metadata dropped, outputs with different prompts or images, an unknown sequence tensor."""

    def test_layout(self):
        a, b = _kwargs([1, 9, 9, 2, 5, 6, 0], 4), _kwargs([1, 9, 9, 2, 7, 0], 4)
        packed, rows = pack_shared_prompt([a, b], 4, [2, 1])
        assert packed['input_ids'].tolist() == [[1, 9, 9, 2, 5, 6, 7]]
        assert rows == [range(4, 6), range(6, 7)]
        assert packed['position_ids'][1, 0].tolist() == [100, 101, 102, 103, 104, 105, 104]
        assert packed['mm_token_type_ids'].tolist() == [[0, 1, 1, 0, 0, 0, 0]]
        assert torch.equal(packed['attention_mask'], tree_mask(4, [2, 1]))
        assert 'cu_seq_lens_q' not in packed and packed['logits_to_keep'] == 1
        assert torch.equal(packed['pixel_values'], a['pixel_values'])

    def test_different_prompts(self):
        a = _kwargs([1, 9, 9, 2, 5, 0], 4)
        assert not shares_prompt(a, _kwargs([1, 9, 9, 3, 5, 0], 4), 4, 4)
        assert not shares_prompt(a, _kwargs([1, 9, 9, 2, 5, 0], 4, pixels=2.0), 4, 4)
        assert not shares_prompt(a, _kwargs([1, 9, 9, 2, 5, 0], 3), 4, 3)
        assert shares_prompt(a, _kwargs([1, 9, 9, 2, 8, 8, 0], 4), 4, 4)
        with pytest.raises(ValueError, match='do not share the prompt'):
            pack_shared_prompt([a, _kwargs([1, 9, 9, 3, 5, 0], 4)], 4, [1, 1])

    def test_unknown_sequence_tensor(self):
        a = _kwargs([1, 9, 9, 2, 5, 0], 4)
        a['token_weights'] = torch.ones(1, 6)
        with pytest.raises(ValueError, match='unknown sequence inputs'):
            pack_shared_prompt([a, dict(a)], 4, [1, 1])


GROUP = ['The answer is red', 'It is a square, I think', 'blue', 'Think step by step. The shape is yellow', '']


def group_kwargs(policy):
    """Two prompts of four/five outputs each: the same text, different images (must not be packed together)."""
    completions = GROUP + GROUP[:4]
    columns = reward_kwargs(policy, completions)
    for i in range(len(completions)):
        columns['images'][i] = [image(colour=(200, 30, 30), seed=1 if i < len(GROUP) else 2)]
        columns['prompt_id'][i] = 'p' if i < len(GROUP) else 'q'
    return completions, columns


class TestRewardPaths:
    """``DDAPO_ATTENTION=shared|rows|eager`` give the same rewards and metrics sample by sample (fp32, 1e-5), equal
    to the naive computation, on every family; shared runs one forward per prompt (pack budget permitting), the
    others one per output. Edge cases: an empty output inside a pack (None), a pack budget that splits a group, a
    hybrid model (Qwen3.5), where shared runs one output per forward."""

    def _run(self, policy, path, pack_tokens=None):
        # the path's own forwards are counted: without the self-check's eager forwards on the first call
        config = DDAPOConfig(attention=path, self_check=False, **({'pack_tokens': pack_tokens} if pack_tokens else {}))
        completions, columns = group_kwargs(policy)
        calls = []
        handle = policy.model.register_forward_pre_hook(lambda *args: calls.append(1))
        try:
            orm = DDAPOAttentionORM(config=config)
            rewards = orm(completions, **columns)
        finally:
            handle.remove()
        return rewards, orm, len(calls), columns

    def test_paths_agree(self, policy):
        eager, eager_orm, eager_calls, columns = self._run(policy, 'eager')
        rows, rows_orm, rows_calls, _ = self._run(policy, 'rows')
        shared, shared_orm, shared_calls, _ = self._run(policy, 'shared')
        # a hybrid model (Qwen3.5: linear-attention layers carry state along the sequence) cannot pack outputs
        hybrid = model_spec(policy).hybrid
        assert hybrid == policy.model_type.startswith('qwen3_5')
        assert (eager_calls, rows_calls, shared_calls) == (9, 9, 9 if hybrid else 2)
        assert eager[4] is None and rows[4] is None and shared[4] is None
        naive = [naive_reward(policy, row) if row.response_token_ids[0] else None for row in rows_of(columns)]
        for rewards in (rows, shared):
            assert rewards == pytest.approx(eager, abs=1e-5)
        assert eager == pytest.approx(naive, abs=1e-5)
        assert len(set(round(r, 6) for r in eager if r is not None)) >= 6  # outputs differ
        # the metrics agree, but the forwards the reward ran itself, which are what the forward hook counted
        for orm, calls in ((eager_orm, eager_calls), (rows_orm, rows_calls), (shared_orm, shared_calls)):
            assert orm.last_metrics.pop('ddapo/own_forwards') == calls
        for orm in (rows_orm, shared_orm):
            assert orm.last_metrics == pytest.approx(eager_orm.last_metrics, abs=1e-5, nan_ok=True)

    def test_pack_budget_splits_group(self, policy):
        eager, *_ = self._run(policy, 'eager')
        shared, _, calls, columns = self._run(policy, 'shared', pack_tokens=60)
        assert 2 < calls < 9 or (model_spec(policy).hybrid and calls == 9)
        assert shared == pytest.approx(eager, abs=1e-5)


class TestSharedPromptUnits:
    """Edge cases: the docstring example, different prompts never share a unit, a lone output over budget."""

    def test_example(self):
        a = _kwargs([1, 9, 9, 2, 5, 0], 4)
        members = [Member(a, 10, 5)] * 3
        assert shared_prompt_units(members, 20) == [[0, 1], [2]]

    def test_prompts_apart_and_over_budget(self):
        a, b = _kwargs([1, 9, 9, 2, 5, 0], 4), _kwargs([1, 9, 9, 3, 5, 0], 4)
        assert shared_prompt_units([Member(a, 4, 1), Member(b, 4, 1), Member(a, 4, 1)], 100) == [[0, 2], [1]]
        assert shared_prompt_units([Member(a, 4, 50), Member(a, 4, 50)], 10) == [[0], [1]]
