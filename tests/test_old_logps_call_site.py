"""Which forward the old-logps runtime patch (swift_patches/grpo_old_logps_scoring.py) enters the reward's channel
around: the old log-prob forward of each micro-batch, known by the statement of ms-swift's `_prepare_batch_inputs` it
is called from, and never the reference or teacher forwards that run in the same loop (OPSD self-distillation and
the LoRA same-model teacher run ``self.model`` on a teacher batch without ``old_per_token_logps``, as the old log-prob
forward does)."""
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace
from typing import Any, List

import pytest
import torch

STUDENT_PROMPT, TEACHER_PROMPT = 'What shape is it?', 'The answer is a circle. What shape is it?'


class Policy(torch.nn.Module):
    """The trainer's model: a module in train mode with a LoRA-style ``disable_adapter`` (the same-model teacher);
    its forward is never run, the trainer's forward is stubbed."""

    def disable_adapter(self):
        return nullcontext()


def opsd_trainer(template, teacher: str, chunks: int):
    """ms-swift's GRPOTrainer class, no training set up, with what `_prepare_batch_inputs` reads for an OPD-RL run
    whose teacher is the policy itself: ``teacher`` is ``'self_distillation'`` (no teacher given: OPSD when a row
    has a teacher prompt) or ``'disable_adapter'`` (the LoRA base model); ``chunks`` micro-batches per step."""
    from accelerate import Accelerator
    from swift.rlhf_trainers.grpo_trainer import GRPOTrainer
    trainer = object.__new__(GRPOTrainer)
    same_model = teacher == 'disable_adapter'
    trainer.__dict__.update(
        model=Policy(), template=template, accelerator=Accelerator(cpu=True), ref_model=None,
        ref_adapter_name=None, beta=0.04, dynamic_num_samples=False, is_multimodal=False, use_teacher_api=False,
        _has_teacher=True, _teacher_model=None, teacher_model=None, _teacher_use_disable_adapter=same_model,
        _is_dynamic_self_distillation=not same_model, _metrics={'train': defaultdict(list), 'eval': defaultdict(list)},
        args=SimpleNamespace(report_to=[], steps_per_generation=chunks, per_device_train_batch_size=2,
                             gradient_checkpointing_kwargs=None, offload_teacher_model=False))
    return trainer


def samples(template, count: int) -> List[Any]:
    """``count`` rollouts of one prompt, each with the OPSD teacher prompt and its own generated ids."""
    from swift.rl_core.data import GRPOSample
    ids = template.tokenizer.encode('a circle', add_special_tokens=False)
    return [GRPOSample(messages=[{'role': 'user', 'content': STUDENT_PROMPT},
                                 {'role': 'assistant', 'content': 'a circle'}],
                       prompt_id='p', request_id=f'r{i}', response_token_ids=[ids[:1 + i % len(ids)]],
                       teacher_prompt=TEACHER_PROMPT) for i in range(count)]


def run_prepare(trainer, rows):
    """ms-swift's real `_prepare_batch_inputs` (runtime-patched), its forward stubbed: returns the batch inputs, the
    channel's entries (request ids, model inputs) and every forward (model inputs, inside the channel?)."""
    from swift_patches import grpo_old_logps_scoring
    entries, forwards, inside = [], [], []

    @contextmanager
    def capture(chunk_samples, model_inputs):
        entries.append(([s.request_id for s in chunk_samples], model_inputs))
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    def forward(model, model_inputs, grpo_batch, compute_entropy=False):
        forwards.append((model_inputs, bool(inside)))
        return torch.zeros(grpo_batch.completion_mask.shape), None

    trainer._get_per_token_logps_and_entropies_single = forward  # what GRPOTrainer's forward method calls
    grpo_old_logps_scoring.open_channel(trainer, capture)
    return type(trainer)._prepare_batch_inputs(trainer, rows), entries, forwards


class TestTeacherForwardOutsideChannel:
    """OPD-RL with the policy as its own teacher: per micro-batch the old log-prob, reference and teacher forwards all
    run ``self.model``; only the old log-prob forward enters the channel, with that micro-batch's samples and model
    inputs, in chunk order. Edge cases: one micro-batch (the teacher call once took the next chunk: StopIteration)
    and two (it took the second chunk's samples for the first's teacher batch); OPSD self-distillation and the LoRA
    same-model teacher (``disable_adapter``), each with an OPSD teacher batch whose ``old_per_token_logps`` is unset;
    the reference forward (beta > 0, no ref model: the adapter-less policy)."""

    @pytest.mark.parametrize('teacher', ['self_distillation', 'disable_adapter'])
    @pytest.mark.parametrize('chunks', [1, 2])
    def test_only_old_logps_forward_captured(self, qwen25, teacher, chunks):
        from swift_patches import grpo_old_logps_scoring
        assert grpo_old_logps_scoring.apply() in ('applied', 'already applied')
        trainer = opsd_trainer(qwen25.template, teacher, chunks)
        rows = samples(qwen25.template, 2 * chunks)
        batches, entries, forwards = run_prepare(trainer, rows)
        students = [b['model_inputs'] for b in batches]
        assert [ids for ids, _ in entries] == [[f'r{2 * k}', f'r{2 * k + 1}'] for k in range(chunks)]
        assert all(inputs is student for (_, inputs), student in zip(entries, students))
        # per micro-batch: old log-probs (in the channel), reference, teacher on its own OPSD batch (both outside)
        assert [captured for _, captured in forwards] == [True, False, False] * chunks
        assert [inputs is students[i // 3] for i, (inputs, _) in enumerate(forwards)] == [True, True, False] * chunks
        assert all(b['grpo_batch'].teacher_per_token_logps is not None for b in batches)


def prepare_without_forward(self, samples):
    gas_chunks = self.split_by_mini_batches(samples)
    for batch in gas_chunks:
        model_inputs, grpo_batch = {}, SimpleNamespace()
        grpo_batch.old_per_token_logps = self._get_per_token_logps_and_entropies(self.ref_model, model_inputs, batch)
    return []


def prepare_forward_not_every_chunk(self, samples):
    gas_chunks = self.split_by_mini_batches(samples)
    for batch in gas_chunks:
        model_inputs, grpo_batch = {}, SimpleNamespace()
        if len(batch) > 1:  # written as ms-swift writes it
            grpo_batch.old_per_token_logps = (
                self._get_per_token_logps_and_entropies(
                    self.model, model_inputs, grpo_batch)[0])
    return []


class TestUnknownCallSite:
    """The runtime patch refuses (PatchError, so plugin.py leaves it off and the reward runs its own forwards) a
    `_prepare_batch_inputs` whose old log-prob forward statement it cannot find, or that does not run it once per
    micro-batch (the chunks would be handed out of step). Edge cases: no such statement; the statement under an
    ``if`` inside the loop."""

    @pytest.mark.parametrize('prepare, expected', [
        (prepare_without_forward, 'has 0 statements grpo_batch.old_per_token_logps ='),
        (prepare_forward_not_every_chunk, 'once per `for batch in gas_chunks` micro-batch'),
    ])
    def test_refused(self, monkeypatch, prepare, expected):
        from swift.rlhf_trainers import grpo_trainer

        from swift_patches import grpo_old_logps_scoring
        for name in ('_prepare_batch_inputs', '_get_per_token_logps_and_entropies', '_generate_and_score_completions'):
            current = getattr(grpo_trainer.GRPOTrainer, name)  # stock again, whatever applied the patch before
            monkeypatch.setattr(grpo_trainer.GRPOTrainer, name, getattr(current, '__wrapped__', current))
        monkeypatch.setattr(grpo_trainer.GRPOTrainer, '_prepare_batch_inputs', prepare)
        with pytest.raises(grpo_old_logps_scoring.PatchError, match=expected):
            grpo_old_logps_scoring.apply()
