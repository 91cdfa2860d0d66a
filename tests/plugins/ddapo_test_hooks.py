"""Test plugin: one more ``--external_plugins`` file, after ``plugin.py``, for the suite's real runs. Nothing here
is part of the product; each hook is switched on by its environment variable.

- ``TEST_DDAPO_DUMP_DIR=DIR``: after every ``ddapo_attention`` call, append one JSON line per completion to
  ``DIR/rank<r>.jsonl`` (global rank): the row's messages, image paths (a scheduler's base64 images as they are),
  generated ids, loss masks and request_id, its reward, the call's mode (train / eval) and global step, the call's
  forwards and padding forwards, its token weights
  where the reward handed some to the trainer, and on validation steps the row's Eq. (12)-(14) part, its ``D_{i,t}``
  and the step's ``ddapo/validity/*`` metrics, so a test can re-score the rows in one process.
- ``TEST_DDAPO_OLD_LOGPS_DUMP=FILE``: after every ``_prepare_batch_inputs`` of the GRPO trainer, append one JSON line
  per micro-batch to ``FILE.rank<r>``: the ``old_per_token_logps`` GRPO recorded (float32 values, exact in JSON) and the
  completion mask, so a test can compare two runs bit for bit.
- ``TEST_DDAPO_STACKS=DIR``: on SIGUSR1, each rank writes every thread's Python stack (faulthandler) to
  ``DIR/stacks.rank<RANK>``, so a test can see where a rank waits.
- ``orms['test_steer']``: a reward that varies with the completion (its first generated token id, in [0, 1)), to
  steer a run in which ``ddapo_attention`` is weighted 0.
- ``TEST_DDAPO_SKIP_PADDING=1``: this rank runs no padding forward. The forward-count gather still runs (every rank
  joins it); the scheduler then sees only this rank's count. Under ZeRO-3 a rank with fewer forwards then waits in a
  collective that the busier rank never joins: the hang the padding forwards prevent.
"""
import dataclasses
import functools
import json
import os
import sys

from swift.rewards import orms

from ddapo.engine import scheduler

DUMP_DIR = os.environ.get('TEST_DDAPO_DUMP_DIR')
OLD_LOGPS_DUMP = os.environ.get('TEST_DDAPO_OLD_LOGPS_DUMP')
STACKS_DIR = os.environ.get('TEST_DDAPO_STACKS')
SKIP_PADDING = os.environ.get('TEST_DDAPO_SKIP_PADDING') == '1'


def _dump_after_call(call):
    def dumped(self, completions, **kwargs):
        rewards = call(self, completions, **kwargs)
        swift, scheduler = self.swift, self.scheduler
        os.makedirs(DUMP_DIR, exist_ok=True)
        validity_metrics = {k: v for k, v in self.last_metrics.items() if k.startswith('ddapo/validity/')}
        with open(os.path.join(DUMP_DIR, f'rank{swift.rank}.jsonl'), 'a') as f:
            for i, (row, reward) in enumerate(zip(swift.rows(kwargs, len(completions)), rewards)):
                validity = self.last_validity.get(i)
                dependency = self.last_dependencies.get(i)
                # a scheduler's base64 images as they are (they re-encode), others as paths
                images = row.images if row.images and all(isinstance(i, str) for i in row.images) else \
                    swift.image_paths(row)
                f.write(json.dumps({'messages': row.messages, 'images': images, 'reward': reward,
                                    'mode': swift.mode, 'step': swift.step,
                                    'response_token_ids': row.response_token_ids,
                                    'response_loss_mask': row.columns.get('response_loss_mask'),
                                    'request_id': row.request_id,
                                    'token_weights': (getattr(swift.trainer, 'token_advantage_weights', None)
                                                      or {}).get(row.request_id),
                                    'forwards': scheduler.last_forwards,
                                    'padding_forwards': scheduler.last_padding,
                                    'validity': None if validity is None else dataclasses.asdict(validity),
                                    'dependency': None if dependency is None else dependency.tolist(),
                                    'validity_metrics': validity_metrics}) + '\n')
        return rewards
    return dumped


def _run_without_padding(run):
    def unpadded(self, outputs, env, report=(), validate=False):
        gather = env.gather

        def own_count(values):
            counts = gather(values)  # the collective every rank joins
            if max(counts) > values[0]:
                # print, not the logger: ms-swift's logger is quiet on ranks other than 0
                print(f'[DDAPO] TEST_DDAPO_SKIP_PADDING=1: skipping {max(counts) - values[0]} padding forward(s) '
                      '(test only)', file=sys.stderr, flush=True)
            return list(values)
        return run(self, outputs, dataclasses.replace(env, gather=own_count), report, validate)
    return unpadded


if DUMP_DIR:
    orms['ddapo_attention'].__call__ = _dump_after_call(orms['ddapo_attention'].__call__)
if SKIP_PADDING:
    scheduler.ForwardScheduler.run = _run_without_padding(scheduler.ForwardScheduler.run)


def _steer(completions, response_token_ids=None, **kwargs):
    """A reward that differs between completions: ((first generated id * 7919) mod 101) / 101."""
    rewards = []
    for turns in response_token_ids or [[]] * len(completions):
        ids = turns[-1] if turns and isinstance(turns[0], (list, tuple)) else turns
        rewards.append(((ids[0] * 7919) % 101) / 101 if ids else 0.0)
    return rewards


class _Steer:
    def __init__(self, args=None, **kwargs):
        pass

    def __call__(self, completions, **kwargs):
        return _steer(completions, **kwargs)


def _dump_old_logps(prepare):
    @functools.wraps(prepare)  # keeps the old-logps patch's flag: the patch is still what runs inside
    def dumped(self, samples):
        batches = prepare(self, samples)
        with open(f'{OLD_LOGPS_DUMP}.rank{self.accelerator.process_index}', 'a') as f:
            for batch in batches:
                grpo_batch = batch['grpo_batch']
                f.write(json.dumps({'old_per_token_logps': grpo_batch.old_per_token_logps.float().tolist(),
                                    'completion_mask': grpo_batch.completion_mask.int().tolist()}) + '\n')
        return batches
    return dumped


orms['test_steer'] = _Steer
if OLD_LOGPS_DUMP:
    from swift.rlhf_trainers.grpo_trainer import GRPOTrainer
    GRPOTrainer._prepare_batch_inputs = _dump_old_logps(GRPOTrainer._prepare_batch_inputs)
if STACKS_DIR:
    import faulthandler
    import signal
    os.makedirs(STACKS_DIR, exist_ok=True)
    _STACKS = open(os.path.join(STACKS_DIR, f"stacks.rank{os.environ.get('RANK', '0')}"), 'a')  # kept open
    faulthandler.register(signal.SIGUSR1, file=_STACKS, all_threads=True)
