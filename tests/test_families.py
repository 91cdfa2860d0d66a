"""The families beyond Qwen, each on a tiny random model built offline (examples/train/grpo/tiny_vlm.py), with ms-swift's
real template: InternVL3 (Qwen2 language model), InternVL3.5 with a Qwen3-MoE language model, GLM-4.1V (template
glm4v), GLM-4.5V (MoE, template glm4_5v, thinking), Gemma 3 (template gemma3_vision: system folded into the first user
turn, sliding-window layers); and MiMo-VL's template on Qwen2.5-VL. Their real swift rlhf runs are in
test_swift_rlhf_e2e.TestModelFamilies."""
import pytest
import torch

import naive_reference
from conftest import OTHER_MODEL_TYPES, image, make_policy
from ddapo.core.config import DDAPOConfig
from ddapo.core.key_sets import build_key_sets
from ddapo.core.report import image_heatmaps
from ddapo.core.row import Row
from ddapo.ms_swift.encoding import SystemTurns, encode_completion
from ddapo.ms_swift.forward_env import policy_forward
from ddapo.ms_swift.model_spec import model_spec
from ddapo.ms_swift.trainer_io import vision_pictures
from ddapo.reward import DDAPOAttentionORM
from test_old_logps import capture_for, micro_batch, old_logps_logits, trainer_attention
from test_reward import COMPLETIONS, reward_kwargs, rows_of

# In process, but five more tiny builds and their forwards (about 1.5 min on 2 cores): in the full suite only, so
# that -m "not slow" stays within its budget.
pytestmark = pytest.mark.slow

# L_att of each build, written from its config by hand: Gemma 3's sliding-window layers (0, 2, 4) are left out
ATTENTION_LAYERS = {'internvl': (0, 1, 2, 3), 'internvl_qwen3_moe': (0, 1, 2, 3), 'glm4v': (0, 1, 2, 3),
                    'glm4v_moe': (0, 1, 2, 3), 'gemma3_vision': (1, 3, 5)}
# the attention implementation ms-swift loads each with (Gemma 3: eager)
TRAINER_ATTENTION = {'gemma3_vision': 'eager'}


@pytest.fixture(scope='module', params=OTHER_MODEL_TYPES)
def policy(request, tiny_model_dir, tmp_path_factory):
    policy = make_policy(tiny_model_dir(request.param), request.param, str(tmp_path_factory.mktemp('output')))
    policy.model_type = request.param
    yield policy
    policy.template.remove_post_encode_hook()


def row(system=None, completion='The answer is red', num_images=1, tokenizer=None):
    """A reward row; ``system``: None (the template's default), '' (no system message), or the system text."""
    messages = [] if not system else [{'role': 'system', 'content': system}]
    messages += [{'role': 'user', 'content': '<image>' * num_images + 'What colour?'},
                 {'role': 'assistant', 'content': completion}]
    return {'messages': messages, 'images': [image(seed=i) for i in range(num_images)],
            'response_token_ids': [tokenizer.encode(completion, add_special_tokens=False)]}


def product_keys(policy, row_):
    spec = model_spec(policy)
    with policy_forward(policy):
        encoded = encode_completion(policy, Row(row_), SystemTurns(policy.template))
    return encoded, build_key_sets(encoded.input_ids, encoded.prompt_len, spec.vision_token_ids, spec.special_ids,
                                   encoded.system_turn), spec


def vision_token_count(policy, encoded, num_images):
    """|V| from the processor's own numbers: InternVL tiles x image_seq_length, GLM merged patches, Gemma pooled."""
    kwargs, processor = encoded.forward_kwargs, policy.processor
    if 'image_grid_thw' in kwargs:
        return int(kwargs['image_grid_thw'].prod(dim=-1).sum()) // processor.image_processor.merge_size ** 2
    if policy.model_type.startswith('internvl'):
        return int(kwargs['pixel_values'].shape[0]) * processor.image_seq_length
    return num_images * policy.model.config.mm_tokens_per_image


class TestSpec:
    """The family is accepted; L_att is the full-attention layers (Gemma 3: not the sliding-window ones); V is the
    config's image placeholder."""

    def test_spec(self, policy):
        spec = model_spec(policy)
        assert spec.attention_layers == ATTENTION_LAYERS[policy.model_type]
        assert spec.image_token_id == policy.model.config.image_token_id
        assert spec.hybrid == (policy.model_type == 'gemma3_vision')

    def test_padding_row(self, policy):
        """The padding forward that keeps a rank in step (ZeRO-3) encodes and runs on every family (its end token)."""
        from ddapo.ms_swift.encoding import padding_row
        encoded = encode_completion(policy, padding_row(policy))
        with policy_forward(policy) as (forward, _):
            assert forward(**encoded.forward_kwargs).logits.shape[1] == 1

    @pytest.mark.parametrize('policy', ['gemma3_vision'], indirect=True)
    def test_gemma_image_token_types(self, policy):
        """ms-swift 4.6.0 with transformers 5.19 marks only ``<start_of_image>`` as image in Gemma 3's token_type_ids
        (docs/architecture.md says so: the soft image tokens attend causally in training); a change shows here."""
        encoded = policy.template.encode(row('', tokenizer=policy.processor.tokenizer))
        marked = {t for t, kind in zip(encoded['input_ids'], encoded['token_type_ids']) if kind == 1}
        assert marked == {policy.processor.tokenizer.convert_tokens_to_ids('<start_of_image>')}


@pytest.mark.parametrize('system', ['message', 'none', 'template_default'])
class TestKeySets:
    """The template's own encodings, as GRPO encodes them: T and V equal the suite's independent ones
    (tests/naive_reference.py: its own system turn per chat format, Gemma's folded system text included) for a
    system message, none, and a default system set as --system sets it; |V| is what the processor made of the image
    (tiles, merged patches, pooled grid); no system text, and no special token, is a text key."""

    def test_key_sets(self, policy, system, tiny_model_dir, tmp_path):
        text = {'message': 'Answer in one word.', 'none': '', 'template_default': None}[system]
        target = policy
        if system == 'template_default':
            text = 'You are a careful visual assistant.'
            target = make_policy(tiny_model_dir(policy.model_type), policy.model_type, str(tmp_path),
                                 default_system=text)
            target.model_type = policy.model_type
        tokenizer = target.processor.tokenizer
        try:
            row_ = row(text if system == 'message' else None if system == 'template_default' else '',
                       num_images=2, tokenizer=tokenizer)
            encoded, keys, spec = product_keys(target, row_)
            batch, input_ids, labels = naive_reference.encode(target, Row(row_))
            naive = naive_reference.key_sets(target, input_ids, labels, naive_reference.generated_ids(row_), row_)
        finally:
            if target is not policy:
                target.template.remove_post_encode_hook()
        assert encoded.input_ids == input_ids and encoded.prompt_len == naive.prompt_len
        assert torch.equal(keys.vision_keys, naive.vision_keys) and torch.equal(keys.text_keys, naive.text_keys)
        assert encoded.system_turn == naive.system_turn and (len(encoded.system_turn) > 0) == bool(text)
        assert keys.num_vision_keys == vision_token_count(target, encoded, 2)
        decoded = tokenizer.decode([input_ids[p] for p in torch.nonzero(keys.text_keys).flatten().tolist()])
        assert 'What colour?' in decoded and (not text or text not in decoded)
        assert not {input_ids[p] for p in torch.nonzero(keys.text_keys).flatten().tolist()} & spec.special_ids


@pytest.mark.parametrize('policy', ['glm4v_moe'], indirect=True)
@pytest.mark.parametrize('thinking', [False, True])
class TestThinking:
    """GLM-4.5V's thinking template (glm4_5v; the other templates here have none), on and off: the response prefix (an
    empty think block with thinking off) is prompt context before exactly the generated ids, and T and V equal the
    independent ones."""

    def test_thinking(self, policy, thinking, monkeypatch):
        assert policy.template.template_meta.is_thinking
        monkeypatch.setattr(policy.template, 'enable_thinking', thinking)
        tokenizer = policy.processor.tokenizer
        completion = 'It is red.</think>\n<answer>red</answer>' if thinking else '<answer>red</answer>'
        row_ = row('', completion=completion, tokenizer=tokenizer)
        encoded, keys, _ = product_keys(policy, row_)
        _, input_ids, labels = naive_reference.encode(policy, Row(row_))
        naive = naive_reference.key_sets(policy, input_ids, labels, naive_reference.generated_ids(row_), row_)
        ids, prompt_len = encoded.input_ids, encoded.prompt_len
        assert ids[prompt_len:prompt_len + encoded.num_generated] == tokenizer.encode(completion, add_special_tokens=False)
        header = tokenizer.decode(ids[:prompt_len])
        assert header.endswith('<|assistant|>\n' + (policy.template._get_response_prefix() or ''))
        assert ('<think></think>' in header) == (not thinking)
        assert torch.equal(keys.text_keys, naive.text_keys) and torch.equal(keys.vision_keys, naive.vision_keys)


class TestBothPaths:
    """The capture on each family's modeling file, under both reward paths, on ms-swift's collated micro-batch (right
    padding, a text-only row): inside the old log-prob forward the logits are bit for bit those without the capture,
    and each output's R^bal equals the reward's own forward and the naive eager output_attentions computation over the
    full-attention layers (fp32, 1e-5); rewards differ between outputs; the report draws the heat maps."""

    def test_same_logits_same_rewards(self, policy, tmp_path):
        policy.args.output_dir = str(tmp_path)
        columns = reward_kwargs(policy, COMPLETIONS, text_only_rows=(2,))
        columns['request_id'] = [f'r{i}' for i in range(len(COMPLETIONS))]
        samples, model_inputs = micro_batch(policy, columns)
        capture, reward = capture_for(policy)
        with trainer_attention(policy, TRAINER_ATTENTION.get(policy.model_type, 'sdpa')):
            plain = old_logps_logits(policy, dict(model_inputs))
            with capture(samples, model_inputs):
                captured = old_logps_logits(policy, dict(model_inputs))
        assert torch.equal(plain, captured)
        rewards = reward(COMPLETIONS, **columns)
        assert reward.scheduler.last_forwards == 0 and reward.not_applicable == {'no_vision_keys': 1}
        own = DDAPOAttentionORM(config=DDAPOConfig(forward='own'))(COMPLETIONS, **columns)
        scored = [0, 1, 3]
        assert rewards[2] is None and own[2] is None
        assert [rewards[i] for i in scored] == pytest.approx([own[i] for i in scored], abs=1e-5)
        naive = [naive_reference.balance_reward(policy, rows_of(columns)[i]) for i in scored]
        assert [rewards[i] for i in scored] == pytest.approx(naive, abs=1e-5)
        assert max(rewards[i] for i in scored) - min(rewards[i] for i in scored) > 1e-3
        assert (tmp_path / 'ddapo' / 'step0000001_train_sample0_image0.png').exists()


def bright_picture(width, height, box):
    """A grey picture with one white rectangle ``box`` (left, top, right, bottom)."""
    from PIL import Image, ImageDraw
    picture = Image.new('RGB', (width, height), (60, 60, 60))
    ImageDraw.Draw(picture).rectangle(box, fill=(255, 255, 255))
    return picture


def crafted_attention(policy, picture, encoded):
    """One value per vision token, in sequence order, written here from each processor's own output: the brightness
    of the part of the image the token covers. InternVL: per tile of ``pixel_values`` (tiles row-major, then the
    thumbnail), a square of tokens; GLM: the image resized to its ``image_grid_thw`` patches, one token per merged
    2 x 2 patches, row-major; Gemma 3: the processor's square image, one token per cell of the pooled grid."""
    import numpy as np
    kwargs, processor = encoded.forward_kwargs, policy.processor
    if policy.model_type.startswith('internvl'):
        side = int(processor.image_seq_length ** 0.5)
        tiles = kwargs['pixel_values'].float().mean(dim=1)  # [tiles, H, W]
        cells = torch.nn.functional.adaptive_avg_pool2d(tiles.unsqueeze(1), side)  # [tiles, 1, side, side]
        return cells.flatten()
    if 'image_grid_thw' in kwargs:
        _, h, w = kwargs['image_grid_thw'][0].tolist()
        patch, merge = processor.image_processor.patch_size, processor.image_processor.merge_size
        seen = np.asarray(picture.resize((w * patch, h * patch)).convert('L'), dtype=float)
        return torch.tensor(seen.reshape(h // merge, merge * patch, w // merge, merge * patch).mean(axis=(1, 3))).flatten()
    side = int(policy.model.config.mm_tokens_per_image ** 0.5)
    pixels = kwargs['pixel_values'][0].float().mean(dim=0)
    return torch.nn.functional.adaptive_avg_pool2d(pixels[None, None], side).flatten()


class TestHeatMapLayout:
    """The report lays each family's vision tokens onto its picture: a wide picture with one bright region in its
    right half, upper part, given an attention vector that follows the brightness the processor saw (crafted from the
    processor's output, not a model) gets its highest heat map cell where the region is. InternVL: the tiles canvas
    (several tiles side by side) and the thumbnail; GLM: merged patches; Gemma 3: the pooled grid."""

    def test_bright_region(self, policy):
        width, height, box = 224, 112, (150, 6, 210, 50)
        picture = bright_picture(width, height, box)
        row_ = {'messages': [{'role': 'user', 'content': '<image>What?'}, {'role': 'assistant', 'content': 'red'}],
                'images': [picture], 'response_token_ids': [policy.processor.tokenizer.encode('red')]}
        encoded, keys, _ = product_keys(policy, row_)
        values = crafted_attention(policy, picture, encoded)
        assert values.numel() == keys.num_vision_keys
        images, grids = vision_pictures(policy, Row(row_), encoded.forward_kwargs)
        heatmaps = image_heatmaps(values, grids)
        if policy.model_type.startswith('internvl'):
            assert len(images) == 2 and grids[0].tiles[1] > 1  # the tiles canvas, then the thumbnail
        for seen, heat in zip(images, heatmaps):
            r, c = divmod(int(heat.argmax()), heat.shape[1])
            # the cell's centre, on the original picture
            x, y = (c + 0.5) / heat.shape[1] * width, (r + 0.5) / heat.shape[0] * height
            assert box[0] - width / heat.shape[1] <= x <= box[2] + width / heat.shape[1], (x, heat.round(1))
            assert box[1] - height / heat.shape[0] <= y <= box[3] + height / heat.shape[0], (y, heat.round(1))
            assert heat.shape[0] * seen.width == pytest.approx(heat.shape[1] * seen.height, rel=0.01)


class TestValidityOnInternVL:
    """Validity (Eq. 12) on a family beyond Qwen: on a validation step InternVL's D_{i,t}, D_i, within-output
    Spearman, rho_out, rho_tok and mean D equal two plain forwards (image tiles zeroed) and torch's KL written in
    test_validity, and the rewards are those of the same call without validation; D differs between outputs."""

    def test_against_naive(self, tiny_model_dir, tmp_path):
        from test_validity import COMPLETIONS as VALIDITY_COMPLETIONS, assert_matches_naive, shared_prompt_columns
        policy = make_policy(tiny_model_dir('internvl'), 'internvl', str(tmp_path))
        try:
            with torch.no_grad():  # the image moves the predictions more: D of about 1e-3 nats, not 1e-6
                policy.model.model.multi_modal_projector.linear_2.weight.mul_(30.0)
            columns = shared_prompt_columns(policy, VALIDITY_COMPLETIONS)
            plain = DDAPOAttentionORM(config=DDAPOConfig(attention='rows'))(VALIDITY_COMPLETIONS, trainer=policy,
                                                                             **columns)
            reward = DDAPOAttentionORM(config=DDAPOConfig(attention='rows', validate_steps=1))
            rewards = reward(VALIDITY_COMPLETIONS, trainer=policy, **columns)
            assert rewards == plain
            assert_matches_naive(policy, rows_of(columns), reward.last_validity, reward.last_dependencies,
                                 reward.last_metrics)
            d_outputs = [v.dependency for v in reward.last_validity.values()]
            assert min(d_outputs) > 0 and max(d_outputs) > 1.05 * min(d_outputs), d_outputs
        finally:
            policy.template.remove_post_encode_hook()


class TestMiMoVL:
    """MiMo-VL is Qwen2.5-VL with ms-swift's mimo_vl template (ChatML with its own default system prompt): its default
    system turn is left out of T exactly as the independent reference finds it, and R^bal equals the naive eager
    computation (fp32, 1e-5)."""

    def test_template(self, tiny_model_dir, tmp_path):
        policy = make_policy(tiny_model_dir('qwen2_5_vl'), 'mimo_vl', str(tmp_path))  # the Qwen2.5-VL build
        try:
            assert 'MiMo' in policy.template.template_meta.default_system
            tokenizer = policy.processor.tokenizer
            row_ = row(None, tokenizer=tokenizer)
            encoded, keys, _ = product_keys(policy, row_)
            _, input_ids, labels = naive_reference.encode(policy, Row(row_))
            naive = naive_reference.key_sets(policy, input_ids, labels, naive_reference.generated_ids(row_), row_)
            assert encoded.system_turn == naive.system_turn and len(naive.system_turn) > 0
            assert torch.equal(keys.text_keys, naive.text_keys) and torch.equal(keys.vision_keys, naive.vision_keys)
            columns = reward_kwargs(policy, COMPLETIONS[:2])
            rewards = DDAPOAttentionORM()(COMPLETIONS[:2], **columns)
            assert rewards == pytest.approx([naive_reference.balance_reward(policy, r) for r in rows_of(columns)],
                                            abs=1e-5)
        finally:
            policy.template.remove_post_encode_hook()
