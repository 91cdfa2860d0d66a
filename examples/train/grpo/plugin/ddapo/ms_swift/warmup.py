"""The reward-weight warm-up (``DDAPO_EARLY_REWARD_WEIGHTS``, ``DDAPO_EARLY_STEPS``) as a transformers
``TrainerCallback``: ms-swift's GRPO reads ``trainer.reward_weights`` (a tensor, one weight per ``--reward_funcs``
entry) wherever it weighs the rewards (``_postprocess_batch``, the advantages, the logged ``reward``), so the callback
writes the weights in force into that tensor at the start of every step, from the global step: every rank the same,
under any rollout (vLLM or Transformers generate), and a resumed run picks the phase up from its restored step.

    on_train_begin  K = switch_step(DDAPO_EARLY_STEPS, max steps); the start log names it
    on_step_begin   trainer.reward_weights <- weights_at(global_step, K, early, --reward_weights); metrics
                    ddapo/reward_weight/<reward name> for that step
"""
from typing import Optional, Sequence, Tuple

import torch
from swift.utils import get_logger
from transformers import TrainerCallback

from ddapo.core.warmup import switch_step, weights_at


class RewardWeightWarmup(TrainerCallback):
    """The early weights until step ``K``, then the trainer's ``--reward_weights``."""

    def __init__(self, trainer, early: Sequence[float], early_steps: float):
        self.trainer = trainer
        self.names = list(trainer.reward_func_names)
        if len(early) != len(self.names):
            raise ValueError(f'DDAPO_EARLY_REWARD_WEIGHTS has {len(early)} weight(s) and --reward_funcs has '
                             f'{len(self.names)} ({", ".join(self.names)}): give one early weight per reward '
                             'function, in the order of --reward_funcs (as --reward_weights)')
        self.early = tuple(float(w) for w in early)
        self.regular = tuple(float(w) for w in trainer.reward_weights.tolist())
        self.early_steps = early_steps
        self.switch: Optional[int] = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.switch = switch_step(self.early_steps, int(state.max_steps or 0))
        if 0 < state.max_steps <= self.switch:
            get_logger().warning(f'[DDAPO] DDAPO_EARLY_STEPS={self.early_steps:g} covers all {state.max_steps} steps: '
                                 'the run never reaches --reward_weights')
        get_logger().info(
            f'[DDAPO] reward-weight warm-up: steps 1..{self.switch} weigh the rewards ({", ".join(self.names)}) with '
            f'DDAPO_EARLY_REWARD_WEIGHTS {list(self.early)}, from step {self.switch + 1} on with --reward_weights '
            f'{list(self.regular)} (DDAPO_EARLY_STEPS={self.early_steps:g} of {state.max_steps} steps; a generation '
            'made before the switch trains with the weights of its step, and ddapo/reward_weight/* is averaged over '
            'each logging window)')

    def on_step_begin(self, args, state, control, **kwargs):
        if self.switch is None:  # a trainer that never began (tests): the phase from max steps as it stands
            self.on_train_begin(args, state, control)
        weights = self.weights(int(state.global_step))
        self.trainer.reward_weights.copy_(torch.tensor(weights, dtype=self.trainer.reward_weights.dtype))
        store = getattr(self.trainer, '_metrics', None)
        if store is not None:
            for name, weight in zip(self.names, weights):
                store['train'][f'ddapo/reward_weight/{name}'].append(weight)

    def weights(self, step: int) -> Tuple[float, ...]:
        return weights_at(step, self.switch, self.early, self.regular)


def install_warmup(trainer, config) -> Optional[RewardWeightWarmup]:
    """Add the warm-up to ``trainer`` when ``DDAPO_EARLY_REWARD_WEIGHTS`` is set (once; a trainer built again keeps
    one). Raises ValueError, at start, when the weights do not match ``--reward_funcs``."""
    if not config.early_reward_weights:
        return None
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, RewardWeightWarmup):
            return callback
    callback = RewardWeightWarmup(trainer, config.early_reward_weights, config.early_steps)
    trainer.add_callback(callback)
    return callback
