"""The reward-weight warm-up of the reference system (seed 002: ``early_reward_weights`` for the first 10% of the
steps, then ``reward_weights``), pure: which step the phase ends at, and the weights in force at a step. The trainer
side (`ddapo.ms_swift.warmup`) puts them where ms-swift's GRPO reads them.

    DDAPO_EARLY_STEPS (a fraction of max steps, or a count), max steps --switch_step--> K
    global step s --weights_at--> DDAPO_EARLY_REWARD_WEIGHTS while s < K, then --reward_weights
"""
import math
from fractions import Fraction
from typing import Sequence, Tuple


def switch_step(early_steps: float, max_steps: int) -> int:
    """``K``, the number of steps that use the early weights: ``early_steps`` below 1 is a fraction of ``max_steps``,
    rounded up (the seed's 10% of 6 steps is 1 step, never 0); 1 or more is a step count. Steps are counted from 0
    (``global_step`` while a step runs), so steps ``0 .. K - 1`` (logged as 1 .. K) are early.

    >>> switch_step(0.1, 6), switch_step(0.1, 100), switch_step(0.25, 8), switch_step(3, 100), switch_step(0.07, 100)
    (1, 10, 2, 3, 7)
    """
    if early_steps <= 0:
        raise ValueError(f'early_steps must be > 0, got {early_steps}')
    if early_steps < 1:
        if max_steps <= 0:
            raise ValueError('a fraction of max steps needs the run\'s max steps (--max_steps, or epochs that give it)')
        # exact decimal arithmetic: 0.07 x 100 is 7.000000000000001 in floats, whose ceil would be 8
        return max(1, math.ceil(Fraction(str(early_steps)) * max_steps))
    return int(early_steps)


def weights_at(step: int, switch: int, early: Sequence[float], regular: Sequence[float]) -> Tuple[float, ...]:
    """The reward weights in force while ``global_step`` is ``step``: ``early`` for ``step < switch``, then ``regular``.

    >>> weights_at(0, 1, (1, 0, 2, 1), (2.5, 0, 0.5, 1)), weights_at(1, 1, (1, 0, 2, 1), (2.5, 0, 0.5, 1))
    ((1, 0, 2, 1), (2.5, 0, 0.5, 1))
    """
    return tuple(early) if step < switch else tuple(regular)
