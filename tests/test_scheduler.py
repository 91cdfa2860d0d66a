"""The forward scheduler (ddapo.engine.scheduler) with a stand-in forward and gather: which outputs share a forward, and how
many padding forwards keep the ranks in step. The real capture runs in test_reward and test_paths."""
from types import SimpleNamespace

import pytest
import torch

from ddapo.core.config import DDAPOConfig
from ddapo.core.key_sets import KeySets
from ddapo.core.row import Row
from ddapo.engine.scheduler import ForwardScheduler, Output


def output(position, prompt, generated=(5,)):
    """An output whose ``[q ; o_i]`` is ``prompt + generated``, as the template's collated forward kwargs."""
    ids = list(prompt) + list(generated)
    encoded = SimpleNamespace(input_ids=ids, prompt_len=len(prompt), num_generated=len(generated), selected=None,
                              key_len=len(prompt), rows=None, generated=list(generated),
                              forward_kwargs={'input_ids': torch.tensor([ids]),
                                              'attention_mask': torch.ones(1, len(ids), dtype=torch.long)})
    keys = KeySets(text_keys=torch.ones(len(ids), dtype=torch.bool), vision_keys=torch.zeros(len(ids), dtype=torch.bool))
    return Output(position, Row({}), encoded, keys)


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
    that captures nothing is reported incomplete; out of memory gives a run that says so."""

    def run(self, outputs, gather, attention='rows', forward=None):
        """``gather``: the stand-in for every rank's counts (``None``: forwards are not collective)."""
        calls = []
        scheduler = ForwardScheduler(DDAPOConfig(attention=attention), (0, 1), hybrid=False)
        filler = output(9, [8, 8])

        def gathered(values):
            calls.append(('gather', values[0]))
            return gather(values)
        env = SimpleNamespace(forward=forward or (lambda **kwargs: calls.append(kwargs['input_ids'])),
                              gather=gathered, padding_encoding=lambda: filler.encoded, collective=gather is not None)
        call = scheduler.run(outputs, env)
        assert call.padding == scheduler.last_padding
        return scheduler, call.runs, calls

    def test_no_gather(self):
        scheduler, runs, calls = self.run([output(0, [1, 2])], None)
        assert len(runs) == 1 and len(calls) == 1 and scheduler.last_padding == scheduler.padding_forwards == 0

    def test_padding_to_busiest_rank(self):
        counts = []
        scheduler, runs, calls = self.run([output(0, [1, 2])], lambda mine: counts.append(mine) or [3, mine[0]])
        assert counts == [[1]] and len(runs) == 1
        assert calls[0] == ('gather', 1) and len(calls) == 4  # the agreement, its forward, two padding forwards
        assert torch.equal(calls[2], calls[1]) and torch.equal(calls[3], calls[1])
        assert scheduler.last_padding == scheduler.padding_forwards == 2

    def test_filler_without_outputs(self):
        _, runs, calls = self.run([], lambda mine: [2, 0])
        assert runs == [] and calls[0] == ('gather', 0) and len(calls) == 3
        assert calls[1].tolist() == calls[2].tolist() == [[8, 8, 5]]

    def test_incomplete_and_oom(self):
        scheduler, runs, _ = self.run([output(0, [1, 2])], None)
        assert not runs[0].complete and runs[0].captures is None and not runs[0].out_of_memory
        assert 'captured 0 of 2 attention layers' in scheduler.incomplete_message(runs[0])
        # every forward and padding forward still runs, so that the ranks stay in step until the reward stops the run
        scheduler, runs, calls = self.run([output(0, [1, 2]), output(1, [3, 4])], lambda mine: [5, mine[0]])
        assert len(runs) == 2 and not any(r.complete for r in runs) and len(calls) == 6 and scheduler.last_padding == 3

        def out_of_memory(**kwargs):
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')

        _, runs, _ = self.run([output(0, [1, 2]), output(1, [1, 2])], None, 'shared', out_of_memory)
        assert len(runs) == 1 and runs[0].captures is None and runs[0].out_of_memory and not runs[0].complete
        assert 'ran out of memory' in runs[0].detail and 'DDAPO_PACK_TOKENS' in runs[0].detail

    def test_oom_without_message(self):
        """An OutOfMemoryError raised with no message (some allocators do) is still this unit's None with a detail,
        not an IndexError in the handler."""
        def out_of_memory(**kwargs):
            raise torch.OutOfMemoryError()

        _, runs, _ = self.run([output(0, [1, 2])], None, 'rows', out_of_memory)
        assert runs[0].out_of_memory and 'ran out of memory (no message)' in runs[0].detail

    def test_failure_between_forwards_keeps_the_count(self, monkeypatch):
        """A unit that fails outside its forward (here its inputs cannot be laid out) is a run with ``failure`` set,
        the next units still run, and its forward is run as padding: this rank runs as many forwards as it agreed
        with the others (under ZeRO-3 one fewer would hang them). An error inside a forward is raised."""
        from ddapo.engine import scheduler as scheduler_module
        real = scheduler_module.captured_forward

        def fails_first(forward, members, *args, **kwargs):
            if members[0].input_ids[0] == 1:
                raise ValueError('cannot lay out')
            return real(forward, members, *args, **kwargs)

        monkeypatch.setattr(scheduler_module, 'captured_forward', fails_first)
        outputs = [output(0, [1, 2]), output(1, [3, 4])]
        scheduler, runs, calls = self.run(outputs, lambda mine: [2, mine[0]])
        assert [bool(r.failure) for r in runs] == [True, False] and 'cannot lay out' in runs[0].failure
        assert not runs[0].complete and len([c for c in calls if not isinstance(c, tuple)]) == 2  # a forward, a padding
        assert scheduler.last_forwards == 1 and scheduler.last_padding == 1

        def broken(**kwargs):
            raise RuntimeError('inside the forward')

        with pytest.raises(RuntimeError, match='inside the forward'):
            self.run([output(1, [3, 4])], None, forward=broken)
