"""The demo's warm start (examples/train/grpo/ddapo_demo.py): a short supervised pass that makes the tiny model
answer. That the warm-started model then answers in a real GRPO run is tested by test_launcher's TestDemo."""
import json
import os

import pytest

from ddapo_demo import THINK_PHRASES, WarmStart, demo_completions, warm_start

SHORT = WarmStart(steps=10)  # on 4 rows: a few seconds a training


@pytest.fixture(scope='module')
def small_dataset(tmp_path_factory):
    from tiny_qwen_vl import build_shapes_dataset
    return build_shapes_dataset(str(tmp_path_factory.mktemp('warm_shapes')), num_rows=4)


class TestDemoCompletions:
    """Edge cases: a colour question, a shape question (said with 'a'); every phrasing ends in the tagged answer."""

    def test_each_phrasing_in_the_format_with_the_solution(self):
        colour = {'messages': [{'role': 'user', 'content': '<image>What colour is the shape?'}], 'solution': 'red'}
        completions = demo_completions(colour)
        assert len(completions) == len(THINK_PHRASES) == len(set(completions))
        assert all(c.startswith('<think> ') and c.endswith('</think><answer> red </answer>') for c in completions)
        assert completions[0] == '<think> the shape is red </think><answer> red </answer>'


class TestWarmStart:
    """Edge cases: bit-identical when repeated; the weights move; cached when the recipe, system prompt and data are
    the same; rebuilt when the system prompt or the recipe change."""

    def test_deterministic_cached_and_rebuilt(self, tiny_model_dir, small_dataset, tmp_path):
        base = tiny_model_dir('qwen2_5_vl')
        first = warm_start(base, small_dataset, str(tmp_path / 'a'), 'Be brief.', SHORT)
        second = warm_start(base, small_dataset, str(tmp_path / 'b'), 'Be brief.', SHORT)
        weights = [os.path.join(d, 'model.safetensors') for d in (base, first, second)]
        data = [open(w, 'rb').read() for w in weights]
        assert data[1] == data[2] and data[1] != data[0]

        mtime = os.path.getmtime(weights[1])
        assert warm_start(base, small_dataset, first, 'Be brief.', SHORT) == first
        assert os.path.getmtime(weights[1]) == mtime  # same recipe: reused

        warm_start(base, small_dataset, first, 'Answer in one word.', SHORT)
        assert json.load(open(os.path.join(first, 'warm_start.json')))['system'] == 'Answer in one word.'
        assert open(weights[1], 'rb').read() != data[1]  # another system prompt, other prompts: trained again

        warm_start(base, small_dataset, first, 'Be brief.', WarmStart(steps=2))
        assert json.load(open(os.path.join(first, 'warm_start.json')))['recipe']['steps'] == 2
