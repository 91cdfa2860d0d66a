"""Validity diagnostics, Eq. (12)-(14) of the DDAPO notation (docs/notation.md, section 5): does the attention reward
agree with the output's real reliance on the image? Pure torch; never part of a reward.

    forward kwargs of x_i --masked_prompt-------------> x~_i: pixel values 0 after normalisation, all else unchanged
    logits of x_i and x~_i at the rows s_{i,t}
                        --token_visual_dependency------> D_{i,t} = KL(p_{i,t} || p~_{i,t})            (Eq. 12)
    D_{i,t}, m^V_{i,t}, R^bal_i --output_validity-----> D_i (Eq. 13) and the within-output Spearman
    every rank's OutputValidity --validity_statistics-> rho_out, rho_tok (Eq. 14), mean D_i, n, undefined reasons

A statistic that is undefined (fewer than 3 values, a constant side) raises or carries a `NotApplicable` reason; the
caller counts it and logs nothing in its place.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ddapo.core.formulas import NotApplicable

# Pixel inputs of the image and video processors of every supported family (Qwen, InternVL, GLM and Gemma 3 name them
# alike), zeroed in the masked prompt.
PIXEL_KEYS = ('pixel_values', 'pixel_values_videos')
MIN_SPEARMAN_VALUES = 3


def masked_prompt(forward_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``x~_i``: the forward kwargs with every pixel tensor set to 0 (after the processor's normalisation: its mean
    colour); token ids, positions, grids and masks are the same objects.

    >>> kwargs = {'input_ids': torch.tensor([[1, 2]]), 'pixel_values': torch.ones(2, 3)}
    >>> masked = masked_prompt(kwargs)
    >>> masked['pixel_values'].abs().sum().item(), masked['input_ids'] is kwargs['input_ids']
    (0.0, True)
    """
    return {k: torch.zeros_like(v) if k in PIXEL_KEYS and isinstance(v, torch.Tensor) else v
            for k, v in forward_kwargs.items()}


def token_visual_dependency(logits: torch.Tensor, masked_logits: torch.Tensor) -> torch.Tensor:
    """Eq. (12): ``D_{i,t} = KL(p_{i,t} || p~_{i,t}) = sum_v p(v) (log p(v) - log p~(v))`` per row, in nats, with
    ``p = softmax(logits)`` and ``p~ = softmax(masked_logits)`` in float32. ``[n, vocab]`` each, ``[n]`` out.

    Example: ``p = (0.5, 0.5)`` against ``p~ = (0.8, 0.2)`` gives ``0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2) = 0.2231``;
    the same distribution gives 0:

    >>> p, q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.8, 0.2]]).log()
    >>> round(token_visual_dependency(p, q).item(), 4), token_visual_dependency(p, p).item()
    (0.2231, 0.0)
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_q = torch.log_softmax(masked_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def average_ranks(values: Sequence[float]) -> List[float]:
    """Ranks from 1, tied values sharing the mean of their ranks.

    >>> average_ranks([0.3, 0.1, 0.3, 0.2])
    [3.5, 1.0, 3.5, 2.0]
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of paired values (Eq. 14): Pearson's correlation of their `average_ranks`.
    Raises `NotApplicable` (``fewer_than_3`` values, ``constant`` side), where it is undefined.

    >>> spearman([1, 2, 3, 4], [10, 20, 40, 30])
    0.8
    >>> spearman([1, 2, 3], [5, 5, 5])
    Traceback (most recent call last):
    ...
    ddapo.core.formulas.NotApplicable: constant: one side of the 3 pairs holds a single value
    """
    if len(x) != len(y):
        raise ValueError(f'spearman needs paired values, got {len(x)} and {len(y)}')
    if len(x) < MIN_SPEARMAN_VALUES:
        raise NotApplicable('fewer_than_3', f'{len(x)} pairs, a rank correlation needs {MIN_SPEARMAN_VALUES}')
    if len(set(x)) == 1 or len(set(y)) == 1:
        raise NotApplicable('constant', f'one side of the {len(x)} pairs holds a single value')
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    covariance = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    spread = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return covariance / spread


@dataclass(frozen=True)
class OutputValidity:
    """One output's part of Eq. (12)-(14) on a validation step, small and picklable (gathered across ranks):
    ``R^bal_i``, ``D_i``, the within-output Spearman of ``m^V_{i,t}`` and ``D_{i,t}`` or why it is undefined
    (``token_reason``); or why the output is left out (``reason``: no defined ``R^bal_i``, no ``D_i``)."""
    reward_balance: Optional[float]
    dependency: Optional[float]  # D_i, Eq. (13)
    spearman_token: Optional[float] = None
    token_reason: Optional[str] = None
    reason: Optional[str] = None

    @classmethod
    def left_out(cls, reason: str) -> 'OutputValidity':
        return cls(None, None, reason=reason)


def output_validity(reward_balance: float, m_vis: torch.Tensor, dependency: torch.Tensor) -> OutputValidity:
    """``D_i = (1/|o_i|) sum_t D_{i,t}`` (Eq. 13) and ``Spearman_t(m^V_{i,t}, D_{i,t})`` of one output (its part of
    ``rho_tok``, Eq. 14) over the tokens where ``m^V_{i,t}`` is defined. ``m_vis``, ``dependency``: ``[|o_i|]``;
    ``|o_i| >= 1`` (an output with a defined ``R^bal``).

    >>> v = output_validity(0.4, torch.tensor([0.1, 0.5, 0.3, 0.2]), torch.tensor([0.0, 2.0, 1.0, 1.0]))
    >>> round(v.dependency, 4), round(v.spearman_token, 4)
    (1.0, 0.9487)
    >>> output_validity(0.4, torch.tensor([0.1, 0.5]), torch.tensor([0.0, 2.0])).token_reason
    'fewer_than_3'
    """
    if m_vis.shape != dependency.shape or dependency.numel() == 0:
        raise ValueError(f'output_validity needs m^V and D over the same |o_i| >= 1 tokens, got {tuple(m_vis.shape)} '
                         f'and {tuple(dependency.shape)}')
    d_output = float(dependency.double().mean())
    defined = torch.isfinite(m_vis) & torch.isfinite(dependency)
    try:
        rho = spearman(m_vis[defined].tolist(), dependency[defined].tolist())
    except NotApplicable as error:
        return OutputValidity(reward_balance, d_output, None, error.reason)
    return OutputValidity(reward_balance, d_output, rho)


@dataclass
class ValidityStatistics:
    """Eq. (14) over a validation step's outputs: the ``ddapo/validity/*`` metrics and the undefined statistics'
    reasons (``{statistic: {reason: count}}``), and the scatter's points ``(R^bal_i, D_i)``."""
    metrics: Dict[str, float] = field(default_factory=dict)
    undefined: Dict[str, Dict[str, int]] = field(default_factory=dict)
    points: List[tuple] = field(default_factory=list)

    @property
    def rho_out(self) -> Optional[float]:
        return self.metrics.get('ddapo/validity/spearman_output')


def validity_statistics(outputs: Sequence[OutputValidity]) -> ValidityStatistics:
    """Eq. (14) over every rank's outputs (those with a ``reason`` are left out and counted under ``left_out``):
    ``ddapo/validity/n`` (outputs used), ``ddapo/validity/D/mean`` (mean ``D_i``), ``ddapo/validity/spearman_output``
    (``rho_out``) and ``ddapo/validity/spearman_token`` (``rho_tok``, the mean over the outputs whose within-output
    correlation is defined). An undefined statistic is left out and its reason counted in ``undefined``: for
    ``spearman_token`` every output whose own correlation is undefined, by reason.

    Example: three outputs whose ``D_i`` rise with ``R^bal_i``; one has too few tokens for ``rho_tok``:

    >>> outputs = [OutputValidity(0.2, 0.1, 0.5), OutputValidity(0.4, 0.3, 1.0), OutputValidity(0.5, 0.9, None, 'fewer_than_3')]
    >>> stats = validity_statistics(outputs + [OutputValidity.left_out('reward_not_applicable')])
    >>> [round(stats.metrics[k], 4) for k in ('ddapo/validity/n', 'ddapo/validity/D/mean',
    ...                                        'ddapo/validity/spearman_output', 'ddapo/validity/spearman_token')]
    [3.0, 0.4333, 1.0, 0.75]
    >>> stats.undefined
    {'left_out': {'reward_not_applicable': 1}, 'spearman_token': {'fewer_than_3': 1}}
    """
    used = [o for o in outputs if o.reason is None]
    stats = ValidityStatistics(metrics={'ddapo/validity/n': float(len(used))},
                               points=[(o.reward_balance, o.dependency) for o in used])

    def undefined(statistic: str, reason: str, count: int = 1) -> None:
        reasons = stats.undefined.setdefault(statistic, {})
        reasons[reason] = reasons.get(reason, 0) + count

    for o in outputs:
        if o.reason is not None:
            undefined('left_out', o.reason)
    if used:
        stats.metrics['ddapo/validity/D/mean'] = sum(o.dependency for o in used) / len(used)
    else:
        undefined('D/mean', 'no_outputs')
    try:
        stats.metrics['ddapo/validity/spearman_output'] = spearman([o.reward_balance for o in used],
                                                                   [o.dependency for o in used])
    except NotApplicable as error:
        undefined('spearman_output', error.reason)
    within = [o.spearman_token for o in used if o.spearman_token is not None]
    for o in used:
        if o.spearman_token is None:
            undefined('spearman_token', o.token_reason or 'undefined')
    if within:
        stats.metrics['ddapo/validity/spearman_token'] = sum(within) / len(within)
    elif not used:
        undefined('spearman_token', 'no_outputs')
    return stats


def undefined_metrics(undefined: Dict[str, Dict[str, int]]) -> Dict[str, float]:
    """The counted reasons as metrics: ``ddapo/validity/undefined/<statistic>/<reason>``, and the outputs left out
    as ``ddapo/validity/left_out/<reason>``.

    >>> undefined_metrics({'spearman_output': {'fewer_than_3': 1}, 'left_out': {'out_of_memory': 2}})
    {'ddapo/validity/left_out/out_of_memory': 2.0, 'ddapo/validity/undefined/spearman_output/fewer_than_3': 1.0}
    """
    return {(f'ddapo/validity/{statistic}/{reason}' if statistic == 'left_out' else
             f'ddapo/validity/undefined/{statistic}/{reason}'): float(count)
            for statistic, reasons in sorted(undefined.items()) for reason, count in sorted(reasons.items())}
