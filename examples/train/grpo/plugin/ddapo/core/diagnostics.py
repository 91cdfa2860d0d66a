"""Per-step ``ddapo/*`` metrics from the reward forward's own numbers (no extra forward). Pure functions.

    per output o_i: DDAPOScores (Eq. 2-7) or a not-applicable reason, and M^V_i per layer segment
    per step (all ranks' outputs): ddapo/tdr/mean, ddapo/tdr/median, ddapo/R_bal/mean (Eq. 7, whatever DDAPO_REWARD), ddapo/rho_text/mean, ddapo/rho_vis/mean,
    ddapo/M_V/mean, ddapo/M_V_prompt/mean and ddapo/M_V_env/mean (its split between the prompt's images and those
    of a trajectory's environment turns), ddapo/eta_V/mean, ddapo/num_text_keys/mean, ddapo/num_vision_keys/mean,
    ddapo/not_applicable_frac (and ddapo/not_applicable/<reason>_frac per reason),
    ddapo/<segment>/M_V/mean for segment in all, early, middle, late,
    ddapo/<segment>/MDI/mean, ddapo/<segment>/H_T/mean, ddapo/<segment>/H_V/mean (Eq. 15-17, notation section 7;
    a metric no output defines is not logged),
    with DDAPO_TOKEN_WEIGHTS=1: ddapo/token_weight/mean, ddapo/token_weight/min, ddapo/token_weight/max,
    ddapo/token_weight/clipped_frac (weights at a DDAPO_TOKEN_WEIGHT_CLIP bound)
"""
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ddapo.core.entropy import AttentionEntropy, Counts, output_entropy
from ddapo.core.formulas import DDAPOScores, layer_set, token_text_mass

THIRDS = ('early', 'middle', 'late')
ENTROPY_METRICS = ('MDI', 'H_T', 'H_V')  # the fields of AttentionEntropy, logged as ddapo/<segment>/<name>/mean


@dataclass(frozen=True)
class WeightStats:
    """Summary of one output's token weights ``w_{i,t}``."""
    total: float
    count: int
    low: float  # smallest weight
    high: float  # largest weight
    at_bounds: int  # weights held at a clip bound (where a bound differs from 1)


@dataclass
class SampleDiagnostics:
    """What one output contributes to the step's metrics (small and picklable, gathered across ranks)."""
    scores: Optional[DDAPOScores] = None
    reason: Optional[str] = None  # the NotApplicable reason when scores is None
    segment_M_vis: Dict[str, float] = field(default_factory=dict)
    token_weights: Optional[WeightStats] = None  # with DDAPO_TOKEN_WEIGHTS=1
    M_V_env: float = 0.0  # the environment's images' part of M^V (notation section 6); 0 for one turn
    # MDI_i, H~^T_i, H~^V_i (Eq. 16, 17) per segment; empty when the scorer got no entropies
    segment_entropy: Dict[str, AttentionEntropy] = field(default_factory=dict)

    @property
    def M_V_prompt(self) -> Optional[float]:
        """The prompt's images' part of ``M^V``: ``M^V - M^V_env``."""
        return None if self.scores is None else self.scores.M_vis - self.M_V_env


def weight_stats(weights: Sequence[float], clip: Tuple[float, float]) -> WeightStats:
    """`WeightStats` of one output's weights; a weight counts as clipped when it sits on a bound other than 1.

    Example: ``[1.0, 1.8, 0.2]`` with clip ``(0.2, 3.0)``:

    >>> weight_stats([1.0, 1.8, 0.2], (0.2, 3.0))
    WeightStats(total=3.0, count=3, low=0.2, high=1.8, at_bounds=1)
    """
    bounds = [b for b in clip if b != 1.0]
    at_bounds = sum(any(abs(w - b) <= 1e-12 for b in bounds) for w in weights)
    return WeightStats(total=float(sum(weights)), count=len(weights), low=float(min(weights)),
                       high=float(max(weights)), at_bounds=at_bounds)


def segments(num_layers: int) -> List[str]:
    """``all``, plus the notation's thirds when the model has at least 3 layers."""
    return ['all'] + (list(THIRDS) if num_layers >= 3 else [])


def segment_vision_mass(masses: torch.Tensor) -> Dict[str, float]:
    """``M^V_i`` (Eq. 5) with ``Lambda`` = each segment of `segments`; ``masses`` is ``[L, |o_i|, 2]`` (all layers).

    Example: 3 layers whose one token puts masses ``[0.9, 0.1]``, ``[0.5, 0.5]``, ``[0.1, 0.9]`` on ``(T, V)``:

    >>> masses = torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]], [[0.1, 0.9]]])
    >>> {k: round(v, 4) for k, v in segment_vision_mass(masses).items()}
    {'all': 0.5, 'early': 0.1, 'middle': 0.5, 'late': 0.9}
    """
    out = {}
    for name in segments(masses.shape[0]):
        m_text = token_text_mass(masses[layer_set(masses.shape[0], name)])
        defined = m_text[~torch.isnan(m_text)]
        out[name] = 1.0 - float(defined.mean()) if defined.numel() else math.nan
    return out


def segment_attention_entropy(masses: torch.Tensor, entropies: torch.Tensor, num_text_keys: Counts,
                              num_vision_keys: Counts, rows: Optional[torch.Tensor] = None) -> Dict[str, AttentionEntropy]:
    """``MDI_i``, ``H~^T_i`` and ``H~^V_i`` (Eq. 16, 17) with ``Lambda`` = each segment of `segments`; ``masses`` and
    ``entropies`` are ``[L, |o_i|, 2]`` (all layers of ``L_att``), the counts ``|T|``, ``|V|`` or per row (a
    trajectory), ``rows`` the rows to average over (all by default; `output_entropy`).

    Example: 3 layers, one token, ``|T| = 2``, ``|V| = 4``; the text mass ``0.5`` spread evenly in every layer
    (``H~^T = 1``); the vision mass ``0.4`` on one key, on two, then on all four (``H~^V = 0, 0.5, 1``); ``all``:
    ``MDI = 1 / (1 + 0.5)``:

    >>> masses = torch.tensor([[[0.5, 0.4]]] * 3)
    >>> entropies = torch.tensor([[[math.log(2), math.log(k)]] for k in (1, 2, 4)])
    >>> {k: (round(e.MDI, 4), round(e.H_V, 4)) for k, e in segment_attention_entropy(masses, entropies, 2, 4).items()}
    {'all': (0.6667, 0.5), 'early': (1.0, 0.0), 'middle': (0.6667, 0.5), 'late': (0.5, 1.0)}
    """
    return {name: output_entropy(masses[layer_set(masses.shape[0], name)],
                                 entropies[layer_set(entropies.shape[0], name)], num_text_keys,
                                 num_vision_keys, rows)
            for name in segments(masses.shape[0])}


def _mean(values: List[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def step_metrics(samples: List[SampleDiagnostics]) -> Dict[str, float]:
    """The step's ``ddapo/*`` metrics over every output of every rank.

    Means are over the outputs whose reward is defined; ``ddapo/tdr/mean`` leaves out ``TDR = inf``
    (``M^V = 0``), which ``ddapo/tdr/median`` keeps. Example: two outputs with TDR 1 and 3 (``m^T = 0.25`` and
    ``0.5``, ``|T| = 10``, ``|V| = 30``) and one output of a text-only prompt:

    >>> from ddapo.core.formulas import sequence_scores
    >>> outputs = [SampleDiagnostics(scores=sequence_scores(torch.tensor([m]), 10, 30)) for m in (0.25, 0.5)]
    >>> metrics = step_metrics(outputs + [SampleDiagnostics(reason='no_vision_keys')])
    >>> [round(metrics[k], 4) for k in ('ddapo/tdr/mean', 'ddapo/tdr/median', 'ddapo/not_applicable_frac')]
    [2.0, 2.0, 0.3333]
    """
    if not samples:
        return {}
    scored = [s for s in samples if s.scores is not None]
    metrics = {'ddapo/not_applicable_frac': 1.0 - len(scored) / len(samples)}
    for reason, count in sorted(Counter(s.reason for s in samples if s.reason).items()):
        metrics[f'ddapo/not_applicable/{reason}_frac'] = count / len(samples)
    if not scored:
        return metrics
    scores = [s.scores for s in scored]
    metrics.update({
        'ddapo/tdr/mean': _mean([s.tdr for s in scores]),
        'ddapo/tdr/median': statistics.median(s.tdr for s in scores),
        'ddapo/rho_text/mean': _mean([s.rho_text for s in scores]),
        'ddapo/rho_vis/mean': _mean([s.rho_vis for s in scores]),
        'ddapo/R_bal/mean': _mean([s.reward_balance for s in scores]),
        'ddapo/M_V/mean': _mean([s.M_vis for s in scores]),
        'ddapo/M_V_prompt/mean': _mean([s.M_V_prompt for s in scored]),
        'ddapo/M_V_env/mean': _mean([s.M_V_env for s in scored]),
        'ddapo/eta_V/mean': _mean([s.eta_vis for s in scores]),
        'ddapo/num_text_keys/mean': _mean([float(s.num_text_keys) for s in scores]),
        'ddapo/num_vision_keys/mean': _mean([float(s.num_vision_keys) for s in scores]),
    })
    for name in sorted({k for s in scored for k in s.segment_M_vis}):
        metrics[f'ddapo/{name}/M_V/mean'] = _mean([s.segment_M_vis.get(name, math.nan) for s in scored])
    for name in sorted({k for s in scored for k in s.segment_entropy}):
        for quantity in ENTROPY_METRICS:  # left out where no output defines it (notation section 7)
            value = _mean([getattr(s.segment_entropy[name], quantity) for s in scored if name in s.segment_entropy])
            if math.isfinite(value):
                metrics[f'ddapo/{name}/{quantity}/mean'] = value
    weights = [s.token_weights for s in scored if s.token_weights is not None and s.token_weights.count]
    if weights:
        count = sum(w.count for w in weights)
        metrics.update({
            'ddapo/token_weight/mean': sum(w.total for w in weights) / count,
            'ddapo/token_weight/min': min(w.low for w in weights),
            'ddapo/token_weight/max': max(w.high for w in weights),
            'ddapo/token_weight/clipped_frac': sum(w.at_bounds for w in weights) / count,
        })
    return metrics
