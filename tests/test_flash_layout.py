"""The old log-prob capture over flash attention (``ddapo_over_flash_attention_2``) on padded micro-batches, and the
guarantee that the capture never raises into the trainer's forward.

flash-attn is not installed here (and needs a GPU): transformers refuses
``set_attn_implementation('flash_attention_2')`` (and ``attn_implementation=`` at load) with an ImportError, so the
tests register a CPU stand-in under flash's name (flash's calling convention and semantics, transformers' own flash
mask function) and set the config's ``_attn_implementation`` directly, as a trainer's ``--attn_impl flash_attn``
leaves it and as the product's ``language_attention`` switches it. transformers 5.19's flash mask function hands the
layers the 2-D padding mask ``[B, S]`` (bool) when a micro-batch is padded, right or left, and ``None`` when it is not
(no padding, or packed ``position_ids`` without a mask).
"""
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import AttentionMaskInterface

from ddapo.core.key_sets import KeySets
from ddapo.engine.capture import ForwardCapture, LayerCapture, capturing, eager_rows
from ddapo.ms_swift.attention import language_attention, wrapped_attention

FLASH = 'flash_attention_2'
KEYS = ('_attn_implementation',)
LAYERS = [0, 1]
# two sequences of different lengths: (prompt length P, generated tokens |o|)
SEQUENCES = ((6, 4), (4, 2))


@pytest.fixture(scope='module')
def model() -> Qwen2ForCausalLM:
    """A tiny random text-only Qwen2 LM (grouped-query heads), fp32, with weights large enough that attention is far
    from uniform (a key wrongly kept or dropped moves the sums by far more than the tolerance)."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=len(LAYERS),
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3, attn_implementation='eager')
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture
def registrations() -> Iterator[None]:
    """Every ``AttentionInterface`` / ``AttentionMaskInterface`` entry as it was before the test, restored after it
    (the stand-in replaces flash's, `wrapped_attention` adds ``ddapo_over_*``)."""
    saved = [(mapping, dict(mapping)) for mapping in (AttentionInterface._global_mapping,
                                                      AttentionMaskInterface._global_mapping)]
    try:
        yield
    finally:
        for mapping, entries in saved:
            mapping.clear()
            mapping.update(entries)


def flash_stand_in(masks_seen: List[Optional[torch.Tensor]]):
    """flash_attention_2's calling convention on CPU, with its semantics for a padding mask: each batch row's kept
    tokens (the 2-D mask's nonzero positions, all of them under ``None``) attend causally among themselves only, as
    flash's varlen kernel on the unpadded tokens; padded rows output zeros. Not for packed rows (``None`` with
    several sequences in a row), which these tests do not run. Each layer's mask is appended to ``masks_seen``."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        masks_seen.append(attention_mask)
        batch, heads, length, dim = query.shape
        output = query.new_zeros(batch, length, heads, dim)
        for b in range(batch):
            kept = (torch.arange(length) if attention_mask is None
                    else attention_mask[b].nonzero().flatten())  # one contiguous block under right or left padding
            sample = F.scaled_dot_product_attention(query[b:b + 1, :, kept], key[b:b + 1, :, kept],
                                                    value[b:b + 1, :, kept], is_causal=True, scale=scaling,
                                                    enable_gqa=True)
            output[b, kept] = sample[0].transpose(0, 1)
        return output, None

    return attention


def sequences() -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(1, 64, (p + n,), generator=generator) for p, n in SEQUENCES]


def key_sets(prompt_len: int, length: int) -> KeySets:
    """Arbitrary ``T`` and ``V`` over the prompt (a third of the keys in neither, as special tokens)."""
    position = torch.arange(length)
    in_prompt = position < prompt_len
    return KeySets(in_prompt & (position % 3 == 0), in_prompt & (position % 3 == 1))


def padded_batch(side: str) -> Tuple[Dict[str, torch.Tensor], List[int]]:
    """The two sequences padded on ``side`` (pad id 0), with the 2-D mask and the positions a collator gives (each
    sequence's own tokens from 0), and where each sequence starts in its row (its pad count on the left)."""
    seqs = sequences()
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    starts = []
    for b, seq in enumerate(seqs):
        start = 0 if side == 'right' else length - len(seq)
        ids[b, start:start + len(seq)], mask[b, start:start + len(seq)] = seq, 1
        starts.append(start)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0) if side == 'left' else torch.arange(length).expand(2, -1)
    return {'input_ids': ids, 'attention_mask': mask, 'position_ids': position_ids}, starts


@contextmanager
def trainer_on(model: Qwen2ForCausalLM, implementation: str) -> Iterator[None]:
    """The trainer's ``--attn_impl`` for the block, set on the config directly (transformers refuses flash without
    flash-attn)."""
    saved, model.config._attn_implementation = model.config._attn_implementation, implementation
    try:
        yield
    finally:
        model.config._attn_implementation = saved


def captures_for(starts: Sequence[int], batch_indices: Sequence[int]) -> List[LayerCapture]:
    """A `LayerCapture` per sequence: its generated rows at its place in the micro-batch."""
    captures = []
    for (prompt_len, generated), start, b in zip(SEQUENCES, starts, batch_indices):
        captures.append(LayerCapture(key_sets(prompt_len, prompt_len + generated), prompt_len,
                                     range(start + prompt_len, start + prompt_len + generated), LAYERS,
                                     batch_index=b, keep_key_attention=False, start=start))
    return captures


def reference_masses(model: Qwen2ForCausalLM, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The Eq. (1) sums of ``seq``'s generated rows, the sequence run alone with eager attention and
    ``output_attentions``: ``[layers, |o|, 2]``, column 0 over ``T``, column 1 over ``V``."""
    with trainer_on(model, 'eager'), torch.no_grad():
        attentions = model(input_ids=seq[None], output_attentions=True).attentions
    keys = key_sets(prompt_len, len(seq))
    sums = []
    for layer in attentions:  # [1, H, S, S]
        mean = layer[0].double().mean(dim=0)[prompt_len:, :prompt_len]  # the generated rows over the prompt's keys
        sums.append(torch.stack([(mean * keys.text_keys[:prompt_len]).sum(-1),
                                 (mean * keys.vision_keys[:prompt_len]).sum(-1)], dim=-1))
    return torch.stack(sums).float()


class TestFlashPaddedMicroBatch:
    """``ddapo_over_flash_attention_2`` on a padded micro-batch of two sequences of different lengths: flash's mask
    function hands the layers the 2-D padding mask, the trainer's logits are bit for bit those without the capture, and
    each sequence's captured Eq. (1) sums equal the same sums of the sequence run alone with eager attention
    (fp32, 1e-5). Edge cases: right padding (the shorter sequence's pad keys after its rows); left padding (the
    sequence starts at its pad count, the capture's ``start``); grouped-query heads; both layers of ``L_att``."""

    @pytest.mark.parametrize('side', ['right', 'left'])
    def test_sums_equal_each_sequence_alone(self, model, registrations, side):
        masks: List[Optional[torch.Tensor]] = []
        AttentionInterface.register(FLASH, flash_stand_in(masks))
        inputs, starts = padded_batch(side)
        forward = ForwardCapture(captures_for(starts, [0, 1]), LAYERS)
        with trainer_on(model, FLASH), torch.no_grad():
            plain = model(**inputs).logits
            with language_attention(model.config, KEYS, wrapped_attention(FLASH)), capturing(forward):
                assert model.config._attn_implementation == 'ddapo_over_' + FLASH
                captured = model(**inputs).logits
            assert model.config._attn_implementation == FLASH  # restored on exit
        assert model.config._attn_implementation == 'eager'
        # flash's mask function handed every layer the 2-D padding mask [B, S], in both forwards
        shape = tuple(inputs['input_ids'].shape)
        assert len(masks) == 2 * len(LAYERS) and all(m.dtype == torch.bool and m.shape == shape for m in masks)
        assert torch.equal(masks[0].long(), inputs['attention_mask'])
        assert torch.equal(plain, captured)
        assert forward.failure is None and forward.complete
        for capture, seq, (prompt_len, _) in zip(forward.finish(), sequences(), SEQUENCES):
            expected = reference_masses(model, seq, prompt_len)
            assert torch.allclose(capture.masses, expected, atol=1e-5, rtol=0), (capture.masses - expected).abs().max()


class TestTwoDimensionalMask:
    """`eager_rows` under a 2-D padding mask counted from the row's start (``key_start`` 0), so that the padding is
    among the keys it reads: the pad keys get probability 0 and the others the plain causal softmax of the sequence's
    own keys, written out here (fp32, 1e-6). Edge cases: left padding (pad keys before the rows), right padding (pad
    keys after them, left out of ``S'``), a bool and an integer mask, grouped-query heads, a chunk of several rows."""

    @pytest.mark.parametrize('dtype', [torch.bool, torch.long])
    @pytest.mark.parametrize('side', ['right', 'left'])
    def test_padding_left_out(self, side, dtype):
        torch.manual_seed(0)
        heads, kv_heads, length, own, dim, scale = 4, 2, 9, 6, 8, 0.4
        query, key = torch.randn(1, heads, length, dim), torch.randn(1, kv_heads, length, dim)
        start = 0 if side == 'right' else length - own
        mask = torch.zeros(1, length, dtype=dtype)
        mask[0, start:start + own] = 1
        rows = slice(start + 3, start + own)
        probabilities = eager_rows(query, key, mask, 0, rows, scale, groups=2)
        assert probabilities.shape == (heads, 3, rows.stop)
        for h in range(heads):
            for c, row in enumerate(range(rows.start, rows.stop)):
                scores = torch.stack([query[0, h, row] @ key[0, h // 2, j] * scale for j in range(start, row + 1)])
                expected = torch.zeros(rows.stop)
                expected[start:row + 1] = torch.softmax(scores, dim=0)
                assert torch.allclose(probabilities[h, c], expected, atol=1e-6, rtol=0)


class TestRecordingNeverRaises:
    """An exception inside the recording (here a capture placed on a batch row the micro-batch does not have) never
    reaches the trainer's forward: its logits are bit for bit those of the forward without capture, and the
    `ForwardCapture` is marked failed (``failure`` holds the error, ``complete`` is False). Edge cases: the wrapper
    over flash attention (the eager formula for the rows) and over eager (the eager map itself); a valid capture
    beside the broken one is not read either; the switch of the config is restored."""

    @pytest.mark.parametrize('implementation', [FLASH, 'eager'])
    def test_failure_marked_output_unchanged(self, model, registrations, implementation):
        AttentionInterface.register(FLASH, flash_stand_in([]))
        inputs, starts = padded_batch('right')
        forward = ForwardCapture(captures_for(starts, [0, 2]), LAYERS)  # batch row 2 of a batch of 2
        with trainer_on(model, implementation), torch.no_grad():
            plain = model(**inputs).logits
            with language_attention(model.config, KEYS, wrapped_attention(implementation)), capturing(forward):
                captured = model(**inputs).logits
            assert model.config._attn_implementation == implementation
        assert torch.equal(plain, captured)
        assert isinstance(forward.failure, str) and 'IndexError' in forward.failure
        assert not forward.complete


class TestRealFlashFunction:
    """transformers' own ``flash_attention_forward`` under ``ddapo_over_flash_attention_2``, with only the kernel call
    (``_flash_attention_forward``, whose loader needs flash-attn and a GPU) replaced by the stand-in's computation: the
    kernel is asked for ``flash_attention_2`` by name (transformers passes ``module.config._attn_implementation`` to
    its loader, which looks any other name up as a hub kernel: the trainer's forward died on every step), the logits
    are those of the plain forward, and the capture equals each sequence alone. Edge case: the config names the
    wrapper again after every layer (the recording and the next layer read it)."""

    def test_kernel_asked_by_its_name(self, model, registrations, monkeypatch):
        from transformers.integrations import flash_attention
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        asked, stand_in = [], flash_stand_in([])

        def kernel(query, key, value, attention_mask, attn_implementation=None, softmax_scale=None, **kwargs):
            asked.append((attn_implementation, model.config._attn_implementation))
            output, _ = stand_in(None, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                 attention_mask, scaling=softmax_scale)
            return output

        monkeypatch.setattr(flash_attention, '_flash_attention_forward', kernel)
        AttentionInterface.register(FLASH, flash_attention.flash_attention_forward)  # transformers' own function
        assert ALL_ATTENTION_FUNCTIONS[FLASH] is flash_attention.flash_attention_forward
        inputs, starts = padded_batch('left')
        forward = ForwardCapture(captures_for(starts, [0, 1]), LAYERS)
        with trainer_on(model, FLASH), torch.no_grad():
            plain = model(**inputs).logits
            asked.clear()
            with language_attention(model.config, KEYS, wrapped_attention(FLASH)), capturing(forward):
                captured = model(**inputs).logits
                assert model.config._attn_implementation == 'ddapo_over_' + FLASH
        assert asked == [(FLASH, FLASH)] * len(LAYERS)
        assert torch.equal(plain, captured) and forward.complete
        for capture, seq, (prompt_len, _) in zip(forward.finish(), sequences(), SEQUENCES):
            assert torch.allclose(capture.masses, reference_masses(model, seq, prompt_len), atol=1e-5, rtol=0)
