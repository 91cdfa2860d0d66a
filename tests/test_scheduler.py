"""The forward scheduler (ddapo.engine.scheduler) with a stand-in forward and gather: which outputs share a forward, and how
many padding forwards keep the ranks in step. The real capture runs in test_reward and test_paths."""
from types import SimpleNamespace

import pytest
import torch

from ddapo.core.config import DDAPOConfig
from ddapo.core.key_sets import KeySets
from ddapo.engine.scheduler import ForwardScheduler, Output


def output(position, prompt, generated=(5,)):
    """An output whose ``[q ; o_i]`` is ``prompt + generated``, as the template's collated forward kwargs."""
    ids = list(prompt) + list(generated)
    encoded = SimpleNamespace(input_ids=ids, prompt_len=len(prompt), num_generated=len(generated),
                              forward_kwargs={'input_ids': torch.tensor([ids]),
                                              'attention_mask': torch.ones(1, len(ids), dtype=torch.long)})
    keys = KeySets(text_keys=torch.ones(len(ids), dtype=torch.bool), vision_keys=torch.zeros(len(ids), dtype=torch.bool))
    return Output(position, {}, encoded, keys)


class TestUnits:
    """Edge cases: shared packs the outputs of one prompt and keeps two prompts apart; rows, eager and a hybrid model
    run one output per forward; the positions stay with their outputs."""

    outputs = [output(0, [1, 2, 3]), output(1, [1, 2, 4]), output(2, [1, 2, 3], (6, 7))]

    @pytest.mark.parametrize('attention, hybrid, expected', [
        ('shared', False, [[0, 2], [1]]),
        ('shared', True, [[0], [1], [2]]),
        ('rows', False, [[0], [1], [2]]),
        ('eager', False, [[0], [1], [2]]),
    ])
    def test_units(self, attention, hybrid, expected):
        scheduler = ForwardScheduler(DDAPOConfig(attention=attention), (0, 1), hybrid=hybrid)
        assert [[o.position for o in unit] for unit in scheduler.units(self.outputs)] == expected


class TestRun:
    """Edge cases: without a gather (forwards not collective) no padding; with one, as many padding forwards as the
    busiest rank has more, on the first output's encoding or the filler when this rank has none; a stand-in forward
    that captures nothing is reported incomplete; out of memory gives a run without captures."""

    def run(self, outputs, gather, attention='rows', forward=None):
        calls = []
        scheduler = ForwardScheduler(DDAPOConfig(attention=attention), (0, 1), hybrid=False)
        filler = output(9, [8, 8])
        runs = list(scheduler.run(forward or (lambda **kwargs: calls.append(kwargs['input_ids'])), outputs, gather,
                                  lambda: filler.encoded, lambda padding, forwards: calls.append(('padding', padding))))
        return scheduler, runs, calls

    def test_no_gather(self):
        scheduler, runs, calls = self.run([output(0, [1, 2])], None)
        assert len(runs) == 1 and len(calls) == 1 and scheduler.last_padding == scheduler.padding_forwards == 0

    def test_padding_to_busiest_rank(self):
        counts = []
        scheduler, runs, calls = self.run([output(0, [1, 2])], lambda mine: counts.append(mine) or [3, mine[0]])
        assert counts == [[1]] and len(runs) == 1
        assert calls[1] == ('padding', 2) and len(calls) == 4  # its forward, the note, two padding forwards
        assert torch.equal(calls[2], calls[0]) and scheduler.last_padding == scheduler.padding_forwards == 2

    def test_filler_without_outputs(self):
        _, runs, calls = self.run([], lambda mine: [2, 0])
        assert runs == [] and calls[0] == ('padding', 2) and calls[1].tolist() == [[8, 8, 5]]

    def test_incomplete_and_oom(self):
        scheduler, runs, _ = self.run([output(0, [1, 2])], None)
        assert not runs[0].complete and runs[0].captures is None
        assert 'captured 0 of 2 attention layers' in scheduler.incomplete_message(runs[0])

        def out_of_memory(**kwargs):
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')

        _, runs, _ = self.run([output(0, [1, 2]), output(1, [1, 2])], None, 'shared', out_of_memory)
        assert len(runs) == 1 and runs[0].captures is None and runs[0].out_of_memory and not runs[0].complete
        assert 'ran out of memory' in runs[0].detail and 'DDAPO_PACK_TOKENS' in runs[0].detail
