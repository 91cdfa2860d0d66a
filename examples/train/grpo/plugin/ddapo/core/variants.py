"""The group variants of the DDAPO reward, Eq. (8) and (9) of the notation (docs/notation.md, section 3): ``R^grp``
from each output's ``log TDR_i`` against its prompt's other outputs, and ``R^gate``, ``R^grp`` gated by correctness.
Pure Python; ``TDR_i`` comes from `ddapo.core.formulas.sequence_scores`.
"""
import math
import statistics
from typing import Dict, Hashable, List, Optional, Sequence

TDR_BOUND = 1e6  # log TDR is taken of TDR clipped to [1/TDR_BOUND, TDR_BOUND]: M^V = 0 gives a large finite value


def log_tdr(tdr: float) -> float:
    """``log TDR_i`` for Eq. (8), with ``TDR_i`` clipped to ``[1e-6, 1e6]`` so ``M^V = 0`` (``TDR = inf``) stays usable.

    Example:

    >>> log_tdr(math.e), round(log_tdr(math.inf), 4), round(math.log(1e6), 4)
    (1.0, 13.8155, 13.8155)
    """
    return math.log(min(max(tdr, 1.0 / TDR_BOUND), TDR_BOUND))


def group_robust_rewards(log_tdrs: Sequence[Optional[float]], groups: Sequence[Hashable], sigma: float = 1.0,
                         eps: float = 1e-6) -> List[Optional[float]]:
    """``R^grp_i = 0.5 * tanh(z_i / sigma)`` of Eq. (8), in ``[-0.5, 0.5]``, per group ``g(q)`` of ``groups``.

    ``z_i = (median_k log TDR_k - log TDR_i) / (1.4826 * MAD_k(log TDR) + eps)`` over the valid outputs of the
    group (``log_tdrs[i] is not None``); a lower TDR (more vision) scores higher. ``0`` for the valid outputs of a
    group with fewer than two valid outputs or with ``MAD < eps``; ``None`` stays ``None`` (not applicable).
    Example: one group with ``log TDR = [0, 1, 2]``: median 1, MAD 1, ``z = [1/1.4826, 0, -1/1.4826]``
    (up to eps):

    >>> [round(r, 4) for r in group_robust_rewards([0, 1, 2], [0, 0, 0])]
    [0.294, 0.0, -0.294]
    """
    if len(log_tdrs) != len(groups):
        raise ValueError(f'{len(log_tdrs)} values for {len(groups)} group labels')
    rewards: List[Optional[float]] = [None] * len(log_tdrs)
    members: Dict[Hashable, List[int]] = {}
    for i, (value, group) in enumerate(zip(log_tdrs, groups)):
        if value is not None:
            members.setdefault(group, []).append(i)
    for indices in members.values():
        values = [log_tdrs[i] for i in indices]
        median = statistics.median(values)
        mad = statistics.median(abs(v - median) for v in values) if len(values) >= 2 else 0.0
        for i in indices:
            if len(values) < 2 or mad < eps:
                rewards[i] = 0.0
            else:
                rewards[i] = 0.5 * math.tanh((median - log_tdrs[i]) / (1.4826 * mad + eps) / sigma)
    return rewards


def gated_rewards(group_rewards: Sequence[Optional[float]], correct: Sequence[bool],
                  groups: Sequence[Hashable]) -> List[Optional[float]]:
    """``R^gate_i = 1[acc_i = 1] * R^grp_i`` of Eq. (9); ``0`` for the whole group when fewer than two of its
    outputs are correct. ``None`` (not applicable) stays ``None``.

    Example: one group, ``R^grp = [0.3, -0.1, None]``; two correct outputs, then one:

    >>> gated_rewards([0.3, -0.1, None], [True, False, True], [0, 0, 0])
    [0.3, 0.0, None]
    >>> gated_rewards([0.3, -0.1, None], [True, False, False], [0, 0, 0])
    [0.0, 0.0, None]
    """
    num_correct: Dict[Hashable, int] = {}
    for ok, group in zip(correct, groups):
        num_correct[group] = num_correct.get(group, 0) + int(bool(ok))
    return [None if r is None else (r if ok and num_correct[g] >= 2 else 0.0)
            for r, ok, g in zip(group_rewards, correct, groups)]
