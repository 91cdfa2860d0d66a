"""A zoom scheduler for multi-turn GRPO ("thinking with images"): the model asks for a region of the row's image, the
environment returns that crop in the next turn, until the model answers. An example beside the DDAPO reward, written in
ms-swift's scheduler API and registered in ``multi_turns``:

    swift rlhf --rlhf_type grpo ... --external_plugins examples/train/grpo/plugin/plugin.py \\
        examples/train/grpo/plugin/zoom_scheduler.py --multi_turn_scheduler ddapo_zoom --max_turns 3

A turn is one of (`parse_turn`):
- ``<answer>...</answer>``: the final answer; the trajectory stops;
- ``<zoom>x0,y0,x1,y1</zoom>``: a crop request, as fractions of the image's width and height;
- anything else: the environment crops the centre (`DEFAULT_BOX`), so that even a model that never learnt the format
  gets environment images.

The crop comes back as a user turn ``<image>Zoomed in on [x0, y0, x1, y1].``. ms-swift keeps a scheduler's images only
when ``step()`` returns them in ``rollout_infos['images']`` (``swift/rl_core/data.py``, ``apply_rollout_output``); so the
request's whole image list goes there each turn, base64-encoded, and the loss's encoding and the reward see the crops.
A row without an image gets a text turn instead (`NO_IMAGE`): its trajectory is text only. The trajectory stops after an
answer or ``--max_turns`` (`DEFAULT_MAX_TURNS` without it); unlike ms-swift's default ``check_finished``, a turn that hit the length limit does not stop
it.
"""
import base64
import re
from io import BytesIO
from typing import Any, Dict, Optional, Tuple

from swift.rollout.multi_turn import MultiTurnScheduler, multi_turns

NAME = 'ddapo_zoom'
DEFAULT_BOX = (0.25, 0.25, 0.75, 0.75)  # the centre half of each side
DEFAULT_MAX_TURNS = 4  # without --max_turns: a model that never answers still stops
NO_IMAGE = 'There is no image to zoom into. Answer in <answer></answer>.'
MIN_SIDE = 0.05  # a requested box narrower or lower than this (as a fraction) is not a request
ZOOM = re.compile(r'<zoom>\s*([0-9.]+)\s*,\s*([0-9.]+)\s*,\s*([0-9.]+)\s*,\s*([0-9.]+)\s*</zoom>')
ANSWER = re.compile(r'<answer>(.*?)</answer>', re.S)


def parse_turn(text: str) -> Tuple[str, Optional[Tuple[float, float, float, float]]]:
    """What a generated turn asks for: ``('answer', None)``, ``('zoom', box)`` for a box ``x0 < x1``, ``y0 < y1`` inside
    ``[0, 1]`` (sides at least `MIN_SIDE`), or ``('default', DEFAULT_BOX)`` for a turn without either.

    >>> parse_turn('It is red. <answer>red</answer>')
    ('answer', None)
    >>> parse_turn('Look closer: <zoom>0.5, 0, 1, 0.5</zoom>')
    ('zoom', (0.5, 0.0, 1.0, 0.5))
    >>> parse_turn('<zoom>0.9,0,0.1,1</zoom>'), parse_turn('no request')
    (('default', (0.25, 0.25, 0.75, 0.75)), ('default', (0.25, 0.25, 0.75, 0.75)))
    """
    if ANSWER.search(text or ''):
        return 'answer', None
    match = ZOOM.search(text or '')
    if match:
        try:
            x0, y0, x1, y1 = (float(v) for v in match.groups())
        except ValueError:  # '1.2.3'
            x0 = y0 = x1 = y1 = -1.0
        if 0 <= x0 and x0 + MIN_SIDE <= x1 <= 1 and 0 <= y0 and y0 + MIN_SIDE <= y1 <= 1:
            return 'zoom', (x0, y0, x1, y1)
    return 'default', DEFAULT_BOX


def crop(image, box: Tuple[float, float, float, float]):
    """``image`` (a PIL image) cropped to ``box`` (fractions of its width and height), at least 1 pixel each way."""
    width, height = image.size
    left, top = min(int(box[0] * width), width - 1), min(int(box[1] * height), height - 1)
    right, bottom = max(int(round(box[2] * width)), left + 1), max(int(round(box[3] * height)), top + 1)
    return image.crop((left, top, right, bottom))


def to_base64(image) -> str:
    """A PNG of ``image`` as the base64 string ms-swift's image loader reads."""
    buffer = BytesIO()
    image.save(buffer, format='PNG')
    return base64.b64encode(buffer.getvalue()).decode()


def load(image: Any):
    """A request's image (a path, URL or base64 string, bytes, ``{'bytes', 'path'}`` or a PIL image) as RGB PIL."""
    from swift.template.vision_utils import load_image
    if isinstance(image, dict):
        image = image.get('bytes') or image.get('path')
    return load_image(image)


class ZoomScheduler(MultiTurnScheduler):
    """ms-swift ``MultiTurnScheduler``: `step` crops the row's first image as the turn asks (`parse_turn`) and returns
    it in a user turn; `check_finished` stops at an answer or ``--max_turns``."""

    def check_finished(self, infer_request, response_choice, current_turn: int) -> bool:
        if parse_turn(response_choice.message.content)[0] == 'answer':
            return True
        return current_turn >= (self.max_turns or DEFAULT_MAX_TURNS)

    def step(self, infer_request, response_choice, current_turn: int) -> Dict[str, Any]:
        if not infer_request.images:
            infer_request.messages.append({'role': 'user', 'content': NO_IMAGE})
            return {'infer_request': infer_request}
        box = parse_turn(response_choice.message.content)[1]
        picture = crop(load(infer_request.images[0]), box)
        infer_request.images.append(to_base64(picture))
        described = ', '.join(f'{v:g}' for v in box)
        infer_request.messages.append({'role': 'user', 'content': f'<image>Zoomed in on [{described}].'})
        # the whole list each turn: ms-swift overwrites rollout_infos per step, and keeps only what it holds
        return {'infer_request': infer_request, 'rollout_infos': {'images': list(infer_request.images)}}


multi_turns[NAME] = ZoomScheduler
