"""Key sets T and V (ddapo_key_sets) on synthetic ids and on real template encodings of tiny Qwen-VL models."""
import pytest
import torch

from conftest import image
from ddapo_key_sets import build_key_sets, system_turn_span

# Word ids for the synthetic examples.
S, E, SYSTEM, USER, ASSISTANT, NL, HI, WHAT, RED, IMG, VID = 100, 101, 5, 6, 7, 8, 9, 10, 11, 50, 51
SPECIAL = {S, E, 99}


def positions(flags):
    return torch.nonzero(flags).flatten().tolist()


class TestSystemTurnSpan:
    """Edge cases: system first turn, user first turn, no <|im_start|>, unterminated turn."""

    def test_docstring_example(self):
        assert system_turn_span([S, SYSTEM, NL, HI, E, NL, S, USER], S, E, [SYSTEM]) == range(0, 5)

    def test_user_first(self):
        assert system_turn_span([S, USER, NL, HI, E], S, E, [SYSTEM]) == range(0)

    def test_no_turn_markers(self):
        assert system_turn_span([HI, WHAT], S, E, [SYSTEM]) == range(0)

    def test_unterminated(self):
        assert system_turn_span([S, SYSTEM, HI], S, E, [SYSTEM]) == range(0)


class TestBuildKeySets:
    """Edge cases: docstring example; video tokens are vision keys; nothing at or after prompt_len is a key;
    text-only prompt has |V| = 0."""

    def test_docstring_example(self):
        ids = [S, SYSTEM, NL, HI, E, S, USER, IMG, IMG, WHAT, E, S, ASSISTANT, RED]
        ks = build_key_sets(ids, 13, {IMG, VID}, SPECIAL, S, E, [SYSTEM])
        assert positions(ks.vision_keys) == [7, 8]
        assert positions(ks.text_keys) == [6, 9, 12]
        assert (ks.num_text_keys, ks.num_vision_keys) == (3, 2)

    def test_video_tokens_are_vision_keys(self):
        ids = [S, USER, VID, VID, VID, WHAT, E, S, ASSISTANT, RED]
        ks = build_key_sets(ids, 9, {IMG, VID}, SPECIAL, S, E, [SYSTEM])
        assert positions(ks.vision_keys) == [2, 3, 4]

    def test_generated_tokens_are_not_keys(self):
        ids = [S, USER, IMG, WHAT, E, S, ASSISTANT, IMG, RED, E]
        ks = build_key_sets(ids, 7, {IMG}, SPECIAL, S, E, [SYSTEM])
        assert positions(ks.vision_keys) == [2] and max(positions(ks.text_keys)) < 7

    def test_text_only_prompt(self):
        ks = build_key_sets([S, USER, WHAT, E, S, ASSISTANT, RED], 6, {IMG}, SPECIAL, S, E, [SYSTEM])
        assert ks.num_vision_keys == 0 and ks.num_text_keys == 3


@pytest.mark.parametrize('num_images', [1, 2])
@pytest.mark.parametrize('with_system', [True, False])
class TestKeySetsOnTemplateEncodings:
    """Real ms-swift encodings of tiny Qwen2.5-VL and Qwen2-VL: one and two images, system turn present/absent."""

    def test_key_sets(self, policy, num_images, with_system):
        from ddapo_swift import model_spec
        tokenizer = policy.processor.tokenizer
        spec = model_spec(policy)
        response = tokenizer.encode('The answer is red', add_special_tokens=False)
        messages = [] if with_system else [{'role': 'system', 'content': ''}]  # '' drops the default system turn
        messages += [{'role': 'user', 'content': '<image>' * num_images + 'What colour?'},
                     {'role': 'assistant', 'content': response}]
        encoded = policy.template.encode({'messages': messages, 'images': [image(seed=i) for i in range(num_images)]})
        ids = list(encoded['input_ids'])
        prompt_len = next(i for i, label in enumerate(encoded['labels']) if label != -100)
        ks = build_key_sets(ids, prompt_len, spec.vision_token_ids, spec.special_ids, spec.im_start_id,
                            spec.im_end_id, spec.system_role_ids)

        merge = policy.processor.image_processor.merge_size**2
        assert ks.num_vision_keys == int(encoded['image_grid_thw'].prod(dim=-1).sum()) // merge
        assert all(ids[p] == 151655 for p in positions(ks.vision_keys))
        text_tokens = [ids[p] for p in positions(ks.text_keys)]
        assert not set(text_tokens) & spec.special_ids
        assert max(positions(ks.text_keys) + positions(ks.vision_keys)) < prompt_len
        decoded = tokenizer.decode(text_tokens)
        assert 'What colour?' in decoded and 'user' in decoded and 'assistant' in decoded
        assert ('helpful' in tokenizer.decode(ids[:prompt_len])) == with_system
        assert 'helpful' not in decoded and 'system' not in decoded.replace(' ', '')
        assert ids[prompt_len:prompt_len + len(response)] == response
