"""Multi-turn GRPO and thinking with images (docs/notation.md, section 6), in one process on the tiny Qwen2.5-VL: the
zoom scheduler (examples/train/grpo/plugin/zoom_scheduler.py) in ms-swift's scheduler API, trajectories built with it
from crafted turns (one parsed crop request, one default crop), their key sets, and the reward on them against the
naive whole-trajectory computation (tests/naive_reference.py), turns whose ids the user or the environment quotes
before them, and the token weights against Eq. (11) written here. The real swift rlhf runs are in test_swift_rlhf_e2e
(TestMultiTurnRun)."""
import base64
import math
from io import BytesIO
from types import SimpleNamespace

import pytest
import torch

import naive_reference
from ddapo.core.row import Row
from ddapo.ms_swift.encoding import (GeneratedIdsMismatch, SystemTurns, encode_completion, locate_trajectory,
                                   template_state)
from ddapo.ms_swift.model_spec import model_spec
from ddapo.reward import DDAPOAttentionORM

import zoom_scheduler
from zoom_scheduler import NO_IMAGE, ZoomScheduler

# slow: about 20 s of in-process forwards and naive references, kept out of -m "not slow" (its budget is 5 minutes)
pytestmark = pytest.mark.slow

QUESTION = 'What colour is the shape?'
ZOOM_UPPER_RIGHT = 'Let me look closer. <zoom>0.5,0,1,0.5</zoom>'
NO_REQUEST = 'Hmm, the shape'
FINAL = 'It is red. <answer>red</answer>'


def red_upper_right(size=112):
    """White, with a red square filling the upper right quarter."""
    from PIL import Image, ImageDraw
    picture = Image.new('RGB', (size, size), (255, 255, 255))
    ImageDraw.Draw(picture).rectangle([size // 2, 0, size - 1, size // 2 - 1], fill=(255, 0, 0))
    return picture


def decoded(image_b64):
    from PIL import Image
    return Image.open(BytesIO(base64.b64decode(image_b64))).convert('RGB')


def choice(text, ids, finish_reason='length'):
    from swift.infer_engine.protocol import ChatCompletionResponseChoice, ChatMessage
    return ChatCompletionResponseChoice(0, ChatMessage('assistant', text), finish_reason, token_ids=list(ids))


def trajectory(policy, turns, prompt_image=True, request_id='req0', question=QUESTION):
    """A row as ms-swift's colocate multi-turn rollout leaves it with the zoom scheduler: each crafted turn's ids, the
    scheduler's ``step`` after every turn but the last (``check_finished`` said go on), and the images of its last
    ``rollout_infos`` (the prompt's image and every crop, base64 as in the rollout request)."""
    from swift.infer_engine.protocol import RolloutInferRequest
    tokenizer = policy.processor.tokenizer
    content = ('<image>' if prompt_image else '') + question
    request = RolloutInferRequest(messages=[{'role': 'user', 'content': content}],
                                  images=[zoom_scheduler.to_base64(red_upper_right())] if prompt_image else [])
    scheduler = ZoomScheduler(max_turns=len(turns))
    images, ids = list(request.images), []
    for k, text in enumerate(turns, start=1):
        ids.append(tokenizer.encode(text, add_special_tokens=False))
        request.messages.append({'role': 'assistant', 'content': text})
        if k < len(turns):
            assert not scheduler.check_finished(request, choice(text, ids[-1]), k)
            step = scheduler.step(request, choice(text, ids[-1]), k)
            request = step['infer_request']
            images = step.get('rollout_infos', {}).get('images', images)
    return {'messages': request.messages, 'images': images, 'response_token_ids': ids, 'request_id': request_id,
            'prompt_id': 'p0', 'response_loss_mask': [[1] * len(t) for t in ids]}


def eq11_weights(m_text, num_text, num_vision, follows, clip):
    """Eq. (11) with sigma_w = 0 and ``clip = (low, high)``, from docs/notation.md (sections 3 and 6), one weight per
    row in order. A row that follows a row (the position before it is one) gets ``clip(c r, low, high)`` with
    ``r = 1 / TDR`` of the row before (Eq. 10: ``m^T |V| / (m^V |T|)`` with the counts that row sees, clipped to
    ``[1e-6, 1e6]``); every other row (the first of each turn) gets 1, and so does a row whose predecessor has an
    undefined ``m^T`` or sees no text or no vision key, which stays out of the mean. ``c`` makes the mean of the
    others 1 (`mean_one_scale`)."""
    low, high = clip
    ratios = {}
    for t in range(1, len(m_text)):
        m, text, vision = m_text[t - 1], num_text[t - 1], num_vision[t - 1]
        if follows[t] and text > 0 and vision > 0 and not math.isnan(m):
            tdr = m * vision / ((1 - m) * text) if m < 1 else math.inf
            ratios[t] = 1 / min(max(tdr, 1e-6), 1e6)
    scale = mean_one_scale(list(ratios.values()), low, high) if ratios else 1.0
    return [min(max(scale * ratios[t], low), high) if t in ratios else 1.0 for t in range(len(m_text))]


def mean_one_scale(values, low, high):
    """The ``c`` with ``mean(clip(c v, low, high)) = 1``, exactly: the mean is nondecreasing and linear in ``c``
    between the kinks where some ``c v`` reaches a bound; it is ``low <= 1`` at ``c = 0`` and ``high >= 1`` at the last
    kink, so 1 lies on one segment, solved linearly there."""
    def mean(c):
        return sum(min(max(c * v, low), high) for v in values) / len(values)

    kinks = sorted({0.0} | {bound / v for v in values for bound in (low, high) if bound > 0})
    a, b = next((a, b) for a, b in zip(kinks, kinks[1:]) if mean(a) <= 1 <= mean(b))
    return a if mean(b) == mean(a) else a + (1 - mean(a)) * (b - a) / (mean(b) - mean(a))


def columns_of(rows, policy):
    columns = {k: [row[k] for row in rows] for k in rows[0]}
    columns['trainer'] = policy
    return columns


class TestZoomScheduler:
    """ms-swift's scheduler API with a real RolloutInferRequest: a parsed request crops that region of the row's first
    image, a turn without one the centre; the image list goes into rollout_infos (ms-swift keeps only that); a row
    without an image gets a text turn; it stops at an answer or max_turns, not at the length limit; registered in
    multi_turns."""

    def test_crops(self, qwen25):
        row = trajectory(qwen25, [ZOOM_UPPER_RIGHT, NO_REQUEST, FINAL])
        assert len(row['images']) == 3
        zoomed, centre = decoded(row['images'][1]), decoded(row['images'][2])
        assert zoomed.size == centre.size == (56, 56)
        assert zoomed.getpixel((28, 28)) == (255, 0, 0)  # all of the red quarter
        assert centre.getpixel((40, 10)) == (255, 0, 0) and centre.getpixel((10, 40)) == (255, 255, 255)
        users = [m['content'] for m in row['messages'] if m['role'] == 'user']
        assert users[1:] == ['<image>Zoomed in on [0.5, 0, 1, 0.5].', '<image>Zoomed in on [0.25, 0.25, 0.75, 0.75].']

    def test_text_only_row(self, qwen25):
        row = trajectory(qwen25, [NO_REQUEST, NO_REQUEST], prompt_image=False)
        assert row['images'] == [] and row['messages'][2] == {'role': 'user', 'content': NO_IMAGE}

    def test_stops(self):
        from swift.infer_engine.protocol import RolloutInferRequest
        from swift.rollout.multi_turn import multi_turns
        assert multi_turns['ddapo_zoom'] is ZoomScheduler
        request = RolloutInferRequest(messages=[{'role': 'user', 'content': 'q'}])
        scheduler = ZoomScheduler(max_turns=3)
        assert scheduler.check_finished(request, choice(FINAL, [1], 'stop'), 1)
        assert not scheduler.check_finished(request, choice(NO_REQUEST, [1], 'length'), 2)
        assert scheduler.check_finished(request, choice(NO_REQUEST, [1], 'length'), 3)
        assert ZoomScheduler().check_finished(request, choice(NO_REQUEST, [1]), zoom_scheduler.DEFAULT_MAX_TURNS)


class TestTrajectoryKeys:
    """The product's encoding of a trajectory against the naive one: the same rows (the trained tokens of every turn),
    the model's earlier turns in neither key set, every image placeholder a vision key, the crops' exactly the
    environment's vision keys (as many as the processor's tokens for them), and each row's visible counts."""

    def test_key_sets(self, qwen25):
        row = trajectory(qwen25, [ZOOM_UPPER_RIGHT, NO_REQUEST, FINAL])
        spec = model_spec(qwen25)
        with template_state(qwen25.template):
            encoded = encode_completion(qwen25, Row(row), SystemTurns(qwen25.template))
        keys = encoded.key_sets(spec.vision_token_ids, spec.special_ids)
        _, naive = naive_reference.trajectory_reward(qwen25, row, details=True)
        assert encoded.rows == naive['rows'] and len(encoded.rows) > sum(len(t) for t in row['response_token_ids'])
        own = sorted(p for p in naive['own'] if p < encoded.rows[-1])
        assert own and not keys.text_keys[own].any() and not keys.vision_keys[own].any()
        assert torch.nonzero(keys.vision_keys).flatten().tolist() == naive['vision']
        grid = encoded.forward_kwargs['image_grid_thw']
        merge = qwen25.template.processor.image_processor.merge_size
        tokens = (grid.prod(dim=-1) // merge ** 2).tolist()  # per image, the processor's count
        assert len(tokens) == 3 and keys.num_vision_keys == sum(tokens)
        assert int(keys.env_vision_keys.sum()) == sum(tokens[1:])  # the crops, and nothing of the prompt
        assert not keys.env_vision_keys[:encoded.prompt_len].any()
        text, vision = keys.visible(encoded.rows)
        assert list(zip(text.tolist(), vision.tolist())) == [(t, v) for t, v, _ in naive['per_row']]
        assert vision.tolist()[0] == tokens[0] and vision.tolist()[-1] == sum(tokens)  # crops seen as they come


class TestQuotedTurns:
    """A turn is located by its labels, not as the first place its ids occur: the question quotes the model's first
    turn (its exact ids are in the prompt, before that turn), and the environment's crop message quotes the last turn
    (its exact ids are between the first turn and the last). The quotes stay text keys and the turns stay where they
    are; the turns, rows, per-row key counts, vision keys and reward equal the naive reference (which matches each
    turn's ids and labels, from the last turn back)."""

    def test_quotes_before_the_turn(self, qwen25):
        quoting = trajectory(qwen25, [NO_REQUEST, FINAL], request_id='question',
                             question=f'{QUESTION} A first guess:\n{NO_REQUEST}')
        env = trajectory(qwen25, [ZOOM_UPPER_RIGHT, FINAL], request_id='environment')
        env['messages'][2] = {**env['messages'][2], 'content': env['messages'][2]['content'] + f' Say:\n{FINAL}'}
        spec = model_spec(qwen25)
        for row, quoted in ((quoting, 0), (env, 1)):
            with template_state(qwen25.template):
                encoded = encode_completion(qwen25, Row(row), SystemTurns(qwen25.template))
            _, naive = naive_reference.trajectory_reward(qwen25, row, details=True)
            ids, turn = naive['input_ids'], row['response_token_ids'][quoted]
            quote = next(p for p in range(len(ids)) if ids[p:p + len(turn)] == turn)
            assert quote + len(turn) <= naive['turns'][quoted].start  # the ids occur first in the quote
            assert encoded.turns == tuple(naive['turns']) and encoded.rows == naive['rows']
            keys = encoded.key_sets(spec.vision_token_ids, spec.special_ids)
            assert keys.text_keys[quote:quote + len(turn)].all()  # the quote is text, not the model's
            assert torch.nonzero(keys.vision_keys).flatten().tolist() == naive['vision']
            text, vision = keys.visible(encoded.rows)
            assert list(zip(text.tolist(), vision.tolist())) == [(t, v) for t, v, _ in naive['per_row']]
        rewards = DDAPOAttentionORM()([''] * 2, **columns_of([quoting, env], qwen25))
        expected = [naive_reference.trajectory_reward(qwen25, row) for row in (quoting, env)]
        assert None not in expected and rewards == pytest.approx(expected, abs=1e-5)


class TestLabelsThatDoNotFit:
    """A trajectory whose labels do not fit its turns raises GeneratedIdsMismatch (a counted None), never a guess at
    where its turns are: a turn its loss leaves unlabelled (no loss mask and --loss_scale last_round: only the last
    turn carries labels); an encoding cut inside its last turn (as a --max_length cut leaves the trainer's)."""

    def test_unlabelled_turn(self, qwen25, monkeypatch):
        monkeypatch.setattr(qwen25.template, '_loss_scale', 'last_round')
        row = trajectory(qwen25, [ZOOM_UPPER_RIGHT, FINAL], request_id='unlabelled')
        row['response_loss_mask'] = []
        labels = naive_reference.encode_trajectory(qwen25, row)[2]
        assert len({p for p, label in enumerate(labels) if label != -100}) == len(row['response_token_ids'][-1])
        orm = DDAPOAttentionORM()
        assert orm([''], **columns_of([row], qwen25)) == [None]
        assert orm.not_applicable == {'generated_ids_mismatch': 1}

    def test_cut_encoding(self, qwen25):
        row = trajectory(qwen25, [ZOOM_UPPER_RIGHT, FINAL], request_id='cut')
        _, input_ids, labels = naive_reference.encode_trajectory(qwen25, row)
        with pytest.raises(GeneratedIdsMismatch):
            locate_trajectory({'input_ids': input_ids[:-3], 'labels': labels[:-3]}, row['response_token_ids'],
                              row['response_loss_mask'], Row(row), None)


class TestTrajectoryReward:
    """DDAPOAttentionORM on trajectories equals the naive whole-trajectory computation (fp32, 1e-5): a parsed crop
    request and a default crop; a text-only prompt whose image comes from the environment (its first turn sees no
    vision key and is left out); a text-only trajectory gives None, counted. The metrics split M^V between the prompt's
    image and the crops; token weights cover every turn's rows, aligned with the trained tokens, and equal Eq. (11)
    computed here (`eq11_weights`: each turn's first row 1, clip bounds that both bind); the report shows the
    trajectory turn by turn with a heat map on each image."""

    def test_equals_naive(self, qwen25):
        rows = [trajectory(qwen25, [ZOOM_UPPER_RIGHT, NO_REQUEST, FINAL], request_id='a'),
                trajectory(qwen25, [NO_REQUEST, FINAL], request_id='b'),
                trajectory(qwen25, [NO_REQUEST, NO_REQUEST], prompt_image=False, request_id='c')]
        env_image = {'messages': [{'role': 'user', 'content': QUESTION}, {'role': 'assistant', 'content': NO_REQUEST},
                                  {'role': 'user', 'content': '<image>Here is the picture.'},
                                  {'role': 'assistant', 'content': FINAL}],
                     'images': [zoom_scheduler.to_base64(red_upper_right())],
                     'response_token_ids': [list(t) for t in rows[1]['response_token_ids']], 'request_id': 'd',
                     'prompt_id': 'p1', 'response_loss_mask': rows[1]['response_loss_mask']}
        rows.append(env_image)
        orm = DDAPOAttentionORM()
        rewards = orm([''] * 4, **columns_of(rows, qwen25))
        expected = [naive_reference.trajectory_reward(qwen25, row) for row in rows]
        assert expected[2] is None and rewards[2] is None
        assert orm.not_applicable == {'no_vision_keys': 1}
        assert [rewards[i] for i in (0, 1, 3)] == pytest.approx([expected[i] for i in (0, 1, 3)], abs=1e-5)
        assert len({round(r, 6) for r in (rewards[0], rewards[1], rewards[3])}) == 3
        _, naive = naive_reference.trajectory_reward(qwen25, env_image, details=True)
        assert naive['per_row'][0][1] == 0 and naive['per_row'][-1][1] > 0  # first turn blind, last turn sees it
        metrics = orm.last_metrics
        assert metrics['ddapo/M_V_env/mean'] > 0 and metrics['ddapo/M_V_prompt/mean'] > 0
        assert metrics['ddapo/M_V_prompt/mean'] + metrics['ddapo/M_V_env/mean'] == pytest.approx(
            metrics['ddapo/M_V/mean'])

    def test_loss_masked_tokens(self, qwen25):
        """Environment text a scheduler wrote into a turn with loss mask 0 (as ms-swift's math_tip_trick does) is no
        row and is a text key; also in a one-turn output, which is then read as a trajectory."""
        tokenizer = qwen25.processor.tokenizer
        tip = tokenizer.encode(' But wait, look again.', add_special_tokens=False)
        two = trajectory(qwen25, [NO_REQUEST, FINAL], request_id='two')
        two['response_token_ids'][0] = two['response_token_ids'][0] + tip
        two['response_loss_mask'][0] = two['response_loss_mask'][0] + [0] * len(tip)
        one = trajectory(qwen25, [NO_REQUEST], request_id='one')
        one['response_token_ids'][0] = one['response_token_ids'][0] + tip
        one['response_loss_mask'][0] = one['response_loss_mask'][0] + [0] * len(tip)
        rewards = DDAPOAttentionORM()([''] * 2, **columns_of([two, one], qwen25))
        expected = [naive_reference.trajectory_reward(qwen25, row, details=True) for row in (two, one)]
        assert rewards == pytest.approx([reward for reward, _ in expected], abs=1e-5)
        rows, own, ids = expected[0][1]['rows'], expected[0][1]['own'], expected[0][1]['input_ids']
        start = next(p for p in range(len(ids)) if ids[p:p + len(tip)] == tip)
        assert not set(range(start, start + len(tip))) & (set(rows) | own)  # keys, not the model's

    def test_token_weights_and_report(self, qwen25, monkeypatch, tmp_path):
        from swift.rlhf_trainers.grpo_trainer import GRPOTrainer
        from swift_patches import grpo_token_weights
        from ddapo.ms_swift.trainer_io import token_weight_store
        monkeypatch.setattr(GRPOTrainer, '_postprocess_batch', GRPOTrainer._postprocess_batch)  # restored afterwards
        grpo_token_weights.apply()
        monkeypatch.setenv('DDAPO_TOKEN_WEIGHTS', '1')
        monkeypatch.setenv('DDAPO_TOKEN_WEIGHT_CLIP', '0.8,1.3')  # inside this model's spread: both bounds are reached
        monkeypatch.setattr(qwen25.args, 'output_dir', str(tmp_path))
        monkeypatch.setattr(qwen25, 'state', SimpleNamespace(global_step=0), raising=False)
        row = trajectory(qwen25, [ZOOM_UPPER_RIGHT, NO_REQUEST, FINAL], request_id='w')
        try:
            DDAPOAttentionORM()([''], **columns_of([row], qwen25))
            weights = token_weight_store(qwen25)['w']
        finally:
            delattr(qwen25, grpo_token_weights.STORE)
        _, naive = naive_reference.trajectory_reward(qwen25, row, details=True)
        rows = naive['rows']
        _, input_ids, labels = naive_reference.encode_trajectory(qwen25, row)
        trained = [p for p, label in enumerate(labels) if label != -100]
        assert len(weights) == len(rows) and trained[:len(weights)] == rows  # the first completion tokens, in order
        text, vision, m_text = ([r[k] for r in naive['per_row']] for k in range(3))
        follows = [k > 0 and rows[k - 1] == rows[k] - 1 for k in range(len(rows))]
        expected = eq11_weights(m_text, text, vision, follows, (0.8, 1.3))
        assert weights == pytest.approx(expected, abs=1e-5)
        assert min(expected) == 0.8 and max(expected) == 1.3 and len(set(expected)) > 4  # clipped both ways, not only
        starts = [k for k in range(len(rows)) if not follows[k]]
        assert len(starts) == 3 and all(weights[k] == 1.0 for k in starts)  # each turn's first token
        report = (tmp_path / 'ddapo' / 'report.md').read_text()
        for n, role in ((1, 'user'), (2, 'generated'), (3, 'user'), (4, 'generated'), (5, 'user'), (6, 'generated')):
            assert f'**turn {n}, {role}**' in report
        assert report.count('![attention per vision token, image') == 3  # the prompt's image and both crops
        assert 'environment images' in report and 'advantage weight w per token' in report
