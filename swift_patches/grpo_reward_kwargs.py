"""Runtime form of ``ms_swift_4.6_grpo_reward_kwargs.diff``: the GRPO trainer hands itself to reward functions.

ms-swift 4.6 passes reward functions text columns only. With this patch applied:
- every reward function call gets ``trainer=<GRPOTrainer>`` in its kwargs, and the column ``response_loss_mask``
  (each row's per-turn loss mask, as a multi-turn scheduler returned it; empty without one), without which a
  reward cannot encode a trajectory as the loss does;
- reward functions with an ``on_trainer_init(trainer)`` method are called once the trainer has built
  its rewards, so they can validate the policy model at start;
- the all-``None`` row warning of ``compute_rewards_per_func`` (which indexes every reward kwarg by
  row) never sees the trainer, so it cannot crash on it.

The diff puts ``trainer`` and the loss masks into ``extra_reward_kwargs`` and skips the trainer in that warning. A
runtime patch cannot edit a line inside ``compute_rewards_per_func``, so here the trainer is bound into each reward
function for the duration of the call instead; reward functions see the same kwargs either way.
`apply()` is idempotent, does nothing when the diff is already in the installed ms-swift, and fails
with a clear message when the methods it wraps are not what it expects.

An ms-swift carrying an earlier version of the diff (`EARLIER_DIFF_MARKERS`; commit 9e25634's passed ``trainer``
but not ``response_loss_mask``) is refused at start with the fix (put it back to stock, then today's diff), neither
patched nor left as it is. Patched, each reward call would get ``trainer`` twice (TypeError). Left as it is, the
rewards would read every row without its loss mask, and nothing downstream refuses such rows: a turn whose masked
prefix or environment text the loss leaves out would be read as a plain completion, or its masked ids counted as the
model's own tokens (`ddapo.ms_swift.encoding.is_trajectory`, `locate_trajectory`), a silently wrong reward.
"""
import functools
import inspect
from contextvars import ContextVar
from typing import Any, Callable, Dict, List, Optional, Tuple

# PatchError: for callers
from swift_patches import PatchError, is_patched, refuse_earlier_diff, require, standing  # noqa: F401

PATCH_FLAG = '__ddapo_reward_kwargs_patch__'
DIFF_MARKER = "'response_loss_mask': [list(s.response_loss_mask or []) for s in samples]"
# Each earlier version of the diff: its marker in _compute_rewards_per_func -> (the commit that shipped it, what it
# lacks). A new version of the diff adds the one it replaces here.
EARLIER_DIFF_MARKERS: Dict[str, Tuple[str, str]] = {
    "extra_reward_kwargs = {'trainer': self}":
    ('9e25634', "passes trainer but not response_loss_mask (multi-turn rows would lose their loss masks; the runtime "
     'patch on top of it would pass trainer twice)'),
}
_TRAINER: ContextVar[Optional[Any]] = ContextVar('ddapo_reward_trainer', default=None)


def _expect(condition: bool, what: str) -> None:
    require(condition, 'grpo_reward_kwargs', what)


def _params(func: Callable) -> List[str]:
    return list(inspect.signature(func).parameters)


def _bind_trainer(reward_func: Callable, trainer: Any, loss_masks: List[Any]) -> Callable:
    """``reward_func`` with ``trainer=trainer`` and ``response_loss_mask=loss_masks`` added to every call; reward
    models are left alone."""
    import torch
    if isinstance(reward_func, torch.nn.Module):
        return reward_func  # called through its plugin with `inputs=`, not with reward kwargs
    from swift.rl_core.grpo_algorithm import _is_async_reward
    if _is_async_reward(reward_func):

        async def bound_async(completions, **kwargs):
            return await reward_func(completions, trainer=trainer, response_loss_mask=loss_masks, **kwargs)

        return bound_async

    def bound(completions, **kwargs):
        return reward_func(completions, trainer=trainer, response_loss_mask=loss_masks, **kwargs)

    return bound


def is_applied() -> bool:
    """True when reward functions receive ``trainer`` (runtime patch or diff)."""
    from swift.rlhf_trainers import grpo_trainer
    return is_patched(grpo_trainer.GRPOTrainer._compute_rewards_per_func, PATCH_FLAG, DIFF_MARKER)


def apply() -> str:
    """Patch ms-swift's GRPO trainer in this process. Returns ``'applied'``, ``'already applied'`` or
    ``'diff installed'``; raises `PatchError` when ms-swift is not the version this patch knows."""
    from swift.rlhf_trainers import grpo_trainer
    trainer_cls = grpo_trainer.GRPOTrainer
    compute = getattr(trainer_cls, '_compute_rewards_per_func', None)
    prepare = getattr(trainer_cls, '_prepare_rewards', None)
    _expect(compute is not None and prepare is not None,
            'GRPOTrainer has no _compute_rewards_per_func / _prepare_rewards')
    state = standing(compute, PATCH_FLAG, DIFF_MARKER)
    if state is not None:
        return state
    refuse_earlier_diff(compute, 'grpo_reward_kwargs', EARLIER_DIFF_MARKERS)
    compute_source = inspect.getsource(compute)
    _expect(_params(compute) == ['self', 'samples'], f'_compute_rewards_per_func{inspect.signature(compute)}')
    _expect('score_completions(' in compute_source and hasattr(grpo_trainer, 'score_completions'),
            '_compute_rewards_per_func no longer calls score_completions')
    score = grpo_trainer.score_completions
    _expect(_params(score)[:2] == ['samples', 'reward_funcs'], f'score_completions{inspect.signature(score)}')
    _expect(_params(prepare)[:2] == ['self', 'reward_funcs'] and 'self.reward_funcs' in inspect.getsource(prepare),
            f'_prepare_rewards{inspect.signature(prepare)} no longer sets self.reward_funcs')

    @functools.wraps(compute)
    def _compute_rewards_per_func(self, samples):
        token = _TRAINER.set(self)
        try:
            return compute(self, samples)
        finally:
            _TRAINER.reset(token)

    @functools.wraps(score)
    def score_completions(samples, reward_funcs, *args, **kwargs):
        trainer = _TRAINER.get()
        if trainer is not None:
            masks = [list(getattr(s, 'response_loss_mask', None) or []) for s in samples]
            reward_funcs = [_bind_trainer(f, trainer, masks) for f in reward_funcs]
        return score(samples, reward_funcs, *args, **kwargs)

    @functools.wraps(prepare)
    def _prepare_rewards(self, *args, **kwargs):
        result = prepare(self, *args, **kwargs)
        for reward_func in self.reward_funcs:
            if hasattr(reward_func, 'on_trainer_init'):
                reward_func.on_trainer_init(self)
        return result

    for wrapper in (_compute_rewards_per_func, score_completions, _prepare_rewards):
        setattr(wrapper, PATCH_FLAG, True)
    trainer_cls._compute_rewards_per_func = _compute_rewards_per_func
    trainer_cls._prepare_rewards = _prepare_rewards
    grpo_trainer.score_completions = score_completions
    return 'applied'
