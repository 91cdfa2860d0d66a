"""Runtime form of ``ms_swift_4.6_grpo_token_weights.diff``: per-token advantage weights from reward functions.

ms-swift 4.6's GRPO gives every token of an output the output's advantage. With this patch, a reward function
may put weights for an output's generated tokens into ``trainer.token_advantage_weights[request_id]`` (a dict
the reward function creates; ``None``, the default, leaves training exactly as stock). Once ms-swift has built
the per-token advantages ``[B, T]`` of each micro-batch (``_postprocess_batch``), the advantages of the first
``len(weights)`` completion tokens of that output are multiplied by them; the tokens the template appends after
the response, and outputs without weights, keep weight 1. The store is emptied after every rollout batch, and
``token_advantage_weights/weighted_frac`` (outputs of the batch that had weights) goes into the trainer's log.

The diff does the same inside ``_postprocess_batch``'s loop over the micro-batches; the runtime patch, which
cannot edit that loop, runs the same function after it over the same micro-batches. `apply()` is idempotent,
does nothing when the diff is already in the installed ms-swift, and fails with a clear message when the method
it wraps is not what it expects.
"""
import functools
import inspect
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# PatchError: for callers
from swift_patches import PatchError, is_patched, refuse_earlier_diff, require, standing  # noqa: F401

STORE = 'token_advantage_weights'
PATCH_FLAG = '__ddapo_token_weights_patch__'
DIFF_MARKER = 'scale_token_advantages('
# Earlier versions of the diff, as in grpo_reward_kwargs: none, the diff is as commit 5ba6bc5 shipped it.
EARLIER_DIFF_MARKERS: Dict[str, Tuple[str, str]] = {}


def scale_token_advantages(advantages: torch.Tensor, completion_mask: torch.Tensor,
                           weights: Sequence[Optional[Sequence[float]]]) -> torch.Tensor:
    """``advantages`` ``[B, T]`` with row ``i``'s first ``len(weights[i])`` completion tokens (the positions where
    ``completion_mask[i]`` is set, in order) multiplied by ``weights[i]``; rows whose weights are ``None`` and the
    remaining completion tokens are unchanged. Returns a new tensor (or ``advantages`` when no row has weights).

    Example: advantages ``[[2, 2, 2, 0]]``, mask ``[[1, 1, 1, 0]]``, weights ``[[1.5, 0.5]]`` (the third
    completion token is one the template appended):

    >>> advantages, mask = torch.tensor([[2.0, 2.0, 2.0, 0.0]]), torch.tensor([[1, 1, 1, 0]])
    >>> scale_token_advantages(advantages, mask, [[1.5, 0.5]]).tolist()
    [[3.0, 1.0, 2.0, 0.0]]
    """
    if len(weights) != advantages.shape[0]:
        raise ValueError(f'{len(weights)} token-weight rows for a micro-batch of {advantages.shape[0]} outputs')
    if all(w is None for w in weights):
        return advantages
    scaled = advantages.clone()
    for i, row in enumerate(weights):
        if row is None:
            continue
        positions = completion_mask[i].nonzero(as_tuple=True)[0]
        if len(positions) < len(row):
            raise ValueError(f'{len(row)} token weights for an output with {len(positions)} completion tokens: the '
                             'weights must come from the same generated tokens the trainer encodes')
        positions = positions[:len(row)]
        scaled[i, positions] = scaled[i, positions] * torch.as_tensor(row, dtype=scaled.dtype, device=scaled.device)
    return scaled


def _expect(condition: bool, what: str) -> None:
    require(condition, 'grpo_token_weights', what)


def open_channel(trainer) -> Dict[str, List[float]]:
    """The token-weight channel of ``trainer``, opened if needed: ``{request_id: w_{i,t}}``, which a reward fills and
    the patched ``_postprocess_batch`` reads and empties per rollout batch. It lives in the trainer attribute the
    diff declares on ``GRPOTrainer`` (`STORE`); only this module touches it."""
    if getattr(trainer, STORE, None) is None:
        setattr(trainer, STORE, {})
    return getattr(trainer, STORE)


def channel(trainer) -> Optional[Dict[str, List[float]]]:
    """``trainer``'s token-weight channel, or None when none was opened."""
    return getattr(trainer, STORE, None)


def is_applied() -> bool:
    """True when ``_postprocess_batch`` applies ``trainer.token_advantage_weights`` (runtime patch or diff)."""
    from swift.rlhf_trainers import grpo_trainer
    return is_patched(grpo_trainer.GRPOTrainer._postprocess_batch, PATCH_FLAG, DIFF_MARKER)


def apply() -> str:
    """Patch ms-swift's GRPO trainer in this process. Returns ``'applied'``, ``'already applied'`` or
    ``'diff installed'``; raises `PatchError` when ms-swift is not the version this patch knows."""
    from swift.rlhf_trainers import grpo_trainer
    trainer_cls = grpo_trainer.GRPOTrainer
    postprocess = getattr(trainer_cls, '_postprocess_batch', None)
    _expect(postprocess is not None, 'GRPOTrainer has no _postprocess_batch')
    state = standing(postprocess, PATCH_FLAG, DIFF_MARKER)
    if state is not None:
        return state
    refuse_earlier_diff(postprocess, 'grpo_token_weights', EARLIER_DIFF_MARKERS)
    source = inspect.getsource(postprocess)
    params = list(inspect.signature(postprocess).parameters)
    _expect(params == ['self', 'samples', 'batch_encoded_inputs'],
            f'_postprocess_batch{inspect.signature(postprocess)}')
    _expect('split_by_mini_batches(samples)' in source and 'grpo_batch.advantages = ' in source,
            '_postprocess_batch no longer sets grpo_batch.advantages per split_by_mini_batches chunk')

    @functools.wraps(postprocess)
    def _postprocess_batch(self, samples, batch_encoded_inputs):
        result = postprocess(self, samples, batch_encoded_inputs)
        store = getattr(self, STORE, None)
        if store is not None:
            weighted = total = 0
            for batch, batch_encoded in zip(self.split_by_mini_batches(samples), batch_encoded_inputs):
                grpo_batch = batch_encoded['grpo_batch']
                weights = [store.get(data.request_id) for data in batch]
                grpo_batch.advantages = scale_token_advantages(grpo_batch.advantages, grpo_batch.completion_mask,
                                                               weights)
                weighted += sum(w is not None for w in weights)
                total += len(weights)
            store.clear()
            mode = 'train' if self.model.training else 'eval'
            self._metrics[mode]['token_advantage_weights/weighted_frac'].append(weighted / max(total, 1))
        return result

    setattr(_postprocess_batch, PATCH_FLAG, True)
    trainer_cls._postprocess_batch = _postprocess_batch
    return 'applied'
