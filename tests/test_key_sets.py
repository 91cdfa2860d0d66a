"""Key sets T and V (ddapo.core.key_sets) on synthetic ids, and on real template encodings of every supported family:
the system turn found from the template (a system message, none, the template's default), thinking on and off."""
from types import SimpleNamespace

import pytest
import torch

from conftest import MODEL_TYPES, image, make_policy
from ddapo.core.row import Row
from ddapo.core.key_sets import build_key_sets, inserted_span
from ddapo.ms_swift.encoding import SystemTurns, encode_completion
from ddapo.ms_swift.model_spec import model_spec
from ddapo.ms_swift.forward_env import policy_forward

# Word ids for the synthetic examples.
S, E, SYSTEM, USER, ASSISTANT, NL, HI, WHAT, RED, IMG, VID, BOS = 100, 101, 5, 6, 7, 8, 9, 10, 11, 50, 51, 99
SPECIAL = {S, E, BOS}


def positions(flags):
    return torch.nonzero(flags).flatten().tolist()


class TestInsertedSpan:
    """Edge cases: ChatML system turn first (the marker it shares with the next turn goes with it, the trailing
    newline is trimmed), after a BOS, no system turn, a rendering that is not one inserted block, a block of blanks."""

    def test_first_turn(self):
        assert inserted_span([S, SYSTEM, NL, HI, E, NL, S, USER], [S, USER], {NL}) == range(0, 5)

    def test_after_bos(self):
        assert inserted_span([BOS, S, SYSTEM, HI, E, NL, S, USER], [BOS, S, USER], {NL}) == range(1, 5)

    def test_equal(self):
        assert inserted_span([S, USER, HI], [S, USER, HI]) == range(0)

    def test_not_one_block(self):
        assert inserted_span([S, SYSTEM, HI, E, S, RED], [S, USER, HI]) is None
        assert inserted_span([S], [S, USER]) is None

    def test_only_blanks(self):
        assert inserted_span([NL, S, USER], [S, USER], {NL}) == range(0)


class TestBuildKeySets:
    """Edge cases: video tokens are vision keys; nothing at or after prompt_len is a key; text-only prompt has
    |V| = 0; without a system turn the role words of the first turn are text."""

    def test_video_tokens_are_vision_keys(self):
        ids = [S, USER, VID, VID, VID, WHAT, E, S, ASSISTANT, RED]
        ks = build_key_sets(ids, 9, {IMG, VID}, SPECIAL)
        assert positions(ks.vision_keys) == [2, 3, 4]

    def test_generated_tokens_are_not_keys(self):
        ids = [S, USER, IMG, WHAT, E, S, ASSISTANT, IMG, RED, E]
        ks = build_key_sets(ids, 7, {IMG}, SPECIAL)
        assert positions(ks.vision_keys) == [2] and max(positions(ks.text_keys)) < 7

    def test_text_only_prompt(self):
        ks = build_key_sets([S, USER, WHAT, E, S, ASSISTANT, RED], 6, {IMG}, SPECIAL)
        assert ks.num_vision_keys == 0 and ks.num_text_keys == 3

    def test_no_system_turn(self):
        ks = build_key_sets([S, SYSTEM, HI, E, S, USER, IMG, E], 8, {IMG}, SPECIAL)
        assert positions(ks.text_keys) == [1, 2, 5]


def row(policy, system=None, question='What colour?', completion='The answer is red', num_images=1):
    """A reward row as ms-swift hands it over; ``system``: None (the template's default), '' (no system), text."""
    messages = [] if system is None else [{'role': 'system', 'content': system}]
    messages += [{'role': 'user', 'content': '<image>' * num_images + question},
                 {'role': 'assistant', 'content': completion}]
    ids = policy.processor.tokenizer.encode(completion, add_special_tokens=False)
    return {'messages': messages, 'images': [image(seed=i) for i in range(num_images)], 'response_token_ids': [ids]}


def key_sets_of(policy, row_, system_turns=None):
    spec = model_spec(policy)
    system_turns = system_turns or SystemTurns(policy.template)
    with policy_forward(policy):
        encoded = encode_completion(policy, Row(row_), system_turns)
    ks = build_key_sets(encoded.input_ids, encoded.prompt_len, spec.vision_token_ids, spec.special_ids,
                        encoded.system_turn)
    return encoded, ks, spec


DEFAULT = 'You are a careful visual assistant.'


@pytest.mark.parametrize('num_images', [1, 2])
@pytest.mark.parametrize('system', ['message', 'none', 'template_default'])
class TestKeySetsOnTemplateEncodings:
    """Real ms-swift GRPO encodings (`encode_sample`, as the reward runs them) of every family: one and two images;
    a system message, no system turn, and the template's default system prompt (Qwen2-VL / Qwen2.5-VL have one
    built in; for the others it is set as `--system` sets it). The system turn's positions are exactly those the
    template renders for it (its role header and end marker included), and no text key comes from it."""

    @pytest.fixture()
    def template_policy(self, policy, system, tiny_model_dir, tmp_path):
        if system != 'template_default' or policy.template.template_meta.default_system:
            yield policy, policy.template.template_meta.default_system if system == 'template_default' else None
            return
        other = make_policy(tiny_model_dir(policy.model_type), policy.model_type, str(tmp_path), default_system=DEFAULT)
        yield other, DEFAULT
        other.template.remove_post_encode_hook()

    def test_key_sets(self, template_policy, num_images, system):
        policy, default = template_policy
        tokenizer = policy.processor.tokenizer
        text = {'message': 'Answer in one word.', 'none': '', 'template_default': None}[system]
        encoded, ks, spec = key_sets_of(policy, row(policy, text, num_images=num_images))
        ids, prompt_len = encoded.input_ids, encoded.prompt_len

        merge = policy.processor.image_processor.merge_size**2
        assert ks.num_vision_keys == int(encoded.forward_kwargs['image_grid_thw'].prod(dim=-1).sum()) // merge
        assert all(ids[p] == spec.image_token_id for p in positions(ks.vision_keys))
        text_tokens = [ids[p] for p in positions(ks.text_keys)]
        assert not set(text_tokens) & spec.special_ids
        assert max(positions(ks.text_keys) + positions(ks.vision_keys)) < prompt_len
        decoded = tokenizer.decode(text_tokens)
        assert 'What colour?' in decoded and 'user' in decoded and 'assistant' in decoded
        expected_system = text if system == 'message' else default if system == 'template_default' else None
        span = encoded.system_turn
        if expected_system:
            assert tokenizer.decode(ids[span.start:span.stop]) == f'<|im_start|>system\n{expected_system}<|im_end|>'
            assert expected_system not in decoded and 'system' not in decoded
        else:
            assert span == range(0) and 'system' not in tokenizer.decode(ids[:prompt_len])
        assert ids[prompt_len:prompt_len + encoded.num_generated] == row(policy)['response_token_ids'][0]


@pytest.mark.parametrize('thinking', [False, True])
class TestThinkingTemplates:
    """Thinking on and off (`enable_thinking`): the template's response prefix (Qwen3-VL and Qwen3.5: ``<think>`` and a
    newline with thinking on; Qwen3.5 also an empty think block with it off) is prompt context: it sits right before
    the generated ids, which are exactly ``response_token_ids`` (a completion that reasons inside ``<think>``
    included); its tokens that the tokenizer does not mark special (``<think>``, ``</think>``, newlines) are text
    keys, the special ones are not."""

    def test_generation_header(self, policy, thinking, monkeypatch):
        monkeypatch.setattr(policy.template, 'enable_thinking', thinking)
        tokenizer = policy.processor.tokenizer
        completion = 'It is red.\n</think>\n\n<answer>red</answer>' if thinking else '<answer>red</answer>'
        encoded, ks, spec = key_sets_of(policy, row(policy, completion=completion))
        ids, prompt_len = encoded.input_ids, encoded.prompt_len
        assert ids[prompt_len:prompt_len + encoded.num_generated] == tokenizer.encode(completion, add_special_tokens=False)
        prefix = policy.template._get_response_prefix() or ''
        header = tokenizer.decode(ids[:prompt_len])
        assert header.endswith('<|im_start|>assistant\n' + prefix)
        if policy.model_type.startswith('qwen3'):
            assert ('<think>' in prefix) == (thinking or policy.model_type.startswith('qwen3_5'))
        prefix_positions = range(prompt_len - len(tokenizer.encode(prefix, add_special_tokens=False)), prompt_len)
        for p in prefix_positions:
            assert bool(ks.text_keys[p]) == (ids[p] not in spec.special_ids)
        if '<think>' in prefix:
            think = tokenizer.convert_tokens_to_ids('<think>')
            assert think not in spec.special_ids
            assert [bool(ks.text_keys[p]) for p in prefix_positions if ids[p] == think] == [True]


class FakeTemplate(SimpleNamespace):
    """A chat format given by its two renderings of the probe (with and without the system message)."""

    def encode(self, data):
        return {'input_ids': self.without if self.__dict__.get('_get_system') else self.with_system}

    def set_mode(self, mode):
        self.mode = mode


class TestSystemTurnCheck:
    """At start: a chat format whose system turn cannot be located (not one block; the system text left in place
    when the system is dropped, as a jinja chat template does) is refused, naming the fix; a row whose encoding
    does not hold its system turn gets None (system_turn_not_found), never a system turn counted as text."""

    def _template(self, policy, with_system, without):
        return FakeTemplate(with_system=with_system, without=without, tokenizer=policy.processor.tokenizer,
                            template_meta=SimpleNamespace(template_type='fake', support_system=True),
                            mode='train', max_length=None, padding_free=False)

    def test_not_one_block(self, policy):
        with pytest.raises(ValueError, match='cannot locate the system turn'):
            SystemTurns(self._template(policy, [1, 2, 3, 4], [1, 5, 4])).check()

    def test_system_left_in_place(self, policy):
        ids = policy.processor.tokenizer.encode('DDAPO probe system message. user', add_special_tokens=False)
        with pytest.raises(ValueError, match='template_backend jinja'):
            SystemTurns(self._template(policy, ids, ids)).check()

    def test_row_without_its_system_turn(self, policy):
        from ddapo.reward import DDAPOAttentionORM
        from test_reward import reward_kwargs
        columns = reward_kwargs(policy, ['red'])
        columns['messages'][0].insert(0, {'role': 'system', 'content': 'Be brief.'})
        orm = DDAPOAttentionORM()
        orm.on_trainer_init(policy)
        orm.swift.system_turns._blocks.clear()
        orm.swift.system_turns.block('Be brief.', {})
        key = next(iter(orm.swift.system_turns._blocks))
        offset, ids = orm.swift.system_turns._blocks[key]
        orm.swift.system_turns._blocks[key] = (offset + 1, ids)  # the template now says it is one token later
        assert orm(['red'], **columns) == [None]
        assert orm.not_applicable == {'system_turn_not_found': 1}
