"""The pure per-output score, and the group variants over every rank's outputs. No ms-swift, no trainer.

    LayerCapture.masses [|L_att|, |o_i|, 2] --score_output--> m^T_{i,t} over Lambda (Eq. 4), rho_text, rho_vis,
                                                             TDR_i, R^bal_i (Eq. 2-7), M^V_i per segment, and
                                                             with token weights on, w_{i,t} (Eq. 11): a `Scored`
    LayerCapture.entropies [|L_att|, |o_i|, 2] (optional) ---> MDI_i, H~^T_i, H~^V_i per segment (Eq. 15-17),
                                                             metrics only
    every rank's `SharedOutput` --group_variant-------------> R^grp_i (Eq. 8) or R^gate_i (Eq. 9), by position

`score_output` is verl's per-sample score: one output's numbers in, its result out; the reward class does the
batching around it (forwards, counting, logging).
"""
from dataclasses import dataclass
from typing import Collection, List, Optional, Sequence, Tuple

import torch

from ddapo.core.diagnostics import SampleDiagnostics, segment_attention_entropy, segment_vision_mass, weight_stats
from ddapo.core.key_sets import KeySets
from ddapo.core.validity import OutputValidity
from ddapo.core.formulas import NotApplicable, scored_rows, sequence_scores, token_env_vision_mass, token_text_mass
from ddapo.core.token_weights import token_weights
from ddapo.core.variants import gated_rewards, group_robust_rewards, log_tdr


@dataclass(frozen=True)
class WeightSettings:
    """``DDAPO_TOKEN_WEIGHT_CLIP`` and ``DDAPO_TOKEN_WEIGHT_SIGMA`` of Eq. (11)."""
    clip: Tuple[float, float]
    sigma: float


@dataclass(frozen=True)
class Scored:
    """One output's result: ``reward`` (``None`` where undefined, ``diagnostics.reason`` and ``detail`` say why)."""
    reward: Optional[float]
    diagnostics: SampleDiagnostics
    detail: str = ''
    m_text: Optional[torch.Tensor] = None  # m^T_{i,t} over Lambda (Eq. 4)
    token_weights: Optional[List[float]] = None  # w_{i,t} (Eq. 11)
    unweighted: Optional['Unweighted'] = None  # token weights on, but left out for this output
    diagnostic_failure: Optional[Exception] = None  # a metric-only computation (the entropies) that failed

    @classmethod
    def not_applicable(cls, reason: str, detail: str) -> 'Scored':
        return cls(None, SampleDiagnostics(reason=reason), detail)


@dataclass(frozen=True)
class Unweighted:
    """Why an output keeps advantage weight 1 although token weights are on: ``reason`` (counted) and ``detail``
    (for the warning)."""
    reason: str
    detail: str


def token_weight_block(labelled: bool) -> Optional[Unweighted]:
    """Why an output's ``w_{i,t}`` could not be matched to its completion tokens in the GRPO loss, or None: a turn's
    generated tokens without a label (``--loss_scale``) are not completion tokens. A trajectory's rows are its labelled
    tokens by construction (notation section 6).

    >>> token_weight_block(labelled=True) is None, token_weight_block(labelled=False).reason
    (True, 'unlabelled_generated_tokens')
    """
    if not labelled:
        return Unweighted('unlabelled_generated_tokens', 'has generated tokens without a label (--loss_scale?)')
    return None


@dataclass(frozen=True)
class RowKeys:
    """What a trajectory's rows see (notation section 6): ``|T_{i,t}|`` and ``|V_{i,t}|`` per row (``[|o_i|]``),
    ``follows`` (the row before each row's position is a row: Eq. 11's ``w`` applies), and ``env_masses``
    ``[|L_att|, |o_i|]``, the Eq. (1) sums over the environment's vision keys ``V_env``."""
    num_text_keys: torch.Tensor
    num_vision_keys: torch.Tensor
    follows: torch.Tensor
    env_masses: torch.Tensor

    @classmethod
    def of(cls, key_sets: KeySets, rows: Sequence[int], env_masses: torch.Tensor) -> 'RowKeys':
        """From the trajectory's key sets and its rows' positions.

        >>> keys = KeySets(torch.tensor([1, 0, 0, 1, 0], dtype=torch.bool), torch.tensor([0, 1, 0, 0, 0], dtype=torch.bool))
        >>> seen = RowKeys.of(keys, [1, 2, 4], torch.zeros(1, 3))
        >>> seen.num_text_keys.tolist(), seen.num_vision_keys.tolist(), seen.follows.tolist()
        ([1, 1, 2], [1, 1, 1], [False, True, False])
        """
        text, vision = key_sets.visible(rows)
        follows = torch.tensor([k > 0 and rows[k - 1] == row - 1 for k, row in enumerate(rows)], dtype=torch.bool)
        return cls(text, vision, follows, env_masses)


def score_output(masses: torch.Tensor, layers: Sequence[int], num_text_keys: int, num_vision_keys: int,
                 generated: Sequence[int] = (), special_ids: Collection[int] = (),
                 weights: Optional[WeightSettings] = None,
                 weight_block: Optional[Unweighted] = None, trajectory: Optional[RowKeys] = None,
                 entropies: Optional[torch.Tensor] = None) -> Scored:
    """Eq. (4)-(7) (and Eq. 10, 11 with ``weights``) of one output from its Eq. (1) sums ``masses [|L_att|, |o_i|, 2]``
    (``(text, vision)`` per layer and generated token), read at the positions ``layers`` of ``L_att`` (Lambda).
    ``trajectory``: a multi-turn output's per-row key counts (which replace ``|T|`` and ``|V|``) and the environment's
    share of ``M^V`` (``M_V_env``; 0 for one turn). ``entropies``: the capture's per-modality entropies
    (`LayerCapture.entropies`, ``[|L_att|, |o_i|, 2]``, Eq. 15 in nats); given, the diagnostics hold ``MDI_i``, ``H~^T_i`` and
    ``H~^V_i`` per segment (Eq. 16, 17, over the rows ``M^V`` per segment averages over), which no reward reads.

    Not applicable (notation section 4) where ``masses`` holds inf or NaN, where the completion is only special
    tokens, and wherever `sequence_scores` says so (empty completion, no vision keys, ...). ``weight_block``
    (`token_weight_block`) leaves the token weights out, with the reward kept.
    Example: one layer, one token putting ``0.6`` on ``T`` and ``0.2`` on ``V``, ``|T| = 10``, ``|V| = 30``:
    ``m^T = 0.75``, ``rho_text = 0.075``, ``rho_vis = 0.25 / 30``, ``TDR = 9``, ``R^bal = 1 / (1 + 9)``:

    >>> scored = score_output(torch.tensor([[[0.6, 0.2]]]), [0], 10, 30)
    >>> round(scored.diagnostics.scores.tdr, 4), round(scored.reward, 4)
    (9.0, 0.1)
    >>> score_output(torch.tensor([[[float('nan'), 0.2]]]), [0], 10, 30).diagnostics.reason
    'non_finite_attention'
    """
    read = masses[list(layers)]
    m_text = token_text_mass(read)
    text_keys, vision_keys = ((num_text_keys, num_vision_keys) if trajectory is None else
                              (trajectory.num_text_keys, trajectory.num_vision_keys))
    try:
        if not bool(torch.isfinite(read).all()):
            raise NotApplicable('non_finite_attention', 'the attention probabilities hold inf or NaN '
                                '(fp16 overflow?); the reward forward runs in the model dtype')
        if generated and all(token in special_ids for token in generated):
            raise NotApplicable('only_special_tokens', f'the completion is only special tokens {list(generated)}')
        scores = sequence_scores(m_text, text_keys, vision_keys)
    except NotApplicable as error:
        return Scored.not_applicable(error.reason, error.detail)
    output_weights = None
    if weights is not None and weight_block is None:
        output_weights = token_weights(m_text, text_keys, vision_keys, weights.clip, weights.sigma,
                                       None if trajectory is None else trajectory.follows).tolist()
    seen, env_share, both = masses, 0.0, None
    if trajectory is not None:  # the rows that see both kinds of key (notation section 6)
        rows = scored_rows(m_text, text_keys, vision_keys)
        both = (trajectory.num_text_keys > 0) & (trajectory.num_vision_keys > 0)
        seen = masses[:, both]
        env_share = float(token_env_vision_mass(read, trajectory.env_masses[list(layers)])[rows].mean())
    entropy, failure = {}, None
    try:  # a diagnostic (Eq. 15-17): its failure is the caller's to count, never the reward's
        if entropies is not None:
            entropy = segment_attention_entropy(masses, entropies, text_keys, vision_keys, both)
    except Exception as error:
        failure = error
    diagnostics = SampleDiagnostics(scores=scores, segment_M_vis=segment_vision_mass(seen),
                                    token_weights=None if output_weights is None else
                                    weight_stats(output_weights, weights.clip), M_V_env=env_share,
                                    segment_entropy=entropy)
    return Scored(scores.reward_balance, diagnostics, m_text=m_text, token_weights=output_weights,
                  unweighted=weight_block if weights is not None else None, diagnostic_failure=failure)


@dataclass(frozen=True)
class SharedOutput:
    """What one output shares with the other ranks (the one gather of a reward call): its metrics' numbers,
    for Eq. (8) / (9) its prompt, ``log TDR_i`` and the gate's verdict, and on validation steps its Eq. (12)-(14)
    part."""
    rank: int
    position: int
    diagnostics: SampleDiagnostics
    prompt_id: Optional[str] = None
    correct: bool = True
    validity: Optional[OutputValidity] = None  # on validation steps: R^bal_i, D_i (Eq. 12-14)

    @property
    def log_tdr(self) -> Optional[float]:
        scores = self.diagnostics.scores
        return None if scores is None else log_tdr(scores.tdr)


@dataclass(frozen=True)
class RankShare:
    """One rank's part of the gather: the forwards the reward ran itself in the call (padding included), its
    outputs' `SharedOutput`, its rank, and why it must stop the call (``None``: it need not), so that every rank
    stops together."""
    own_forwards: int
    outputs: List[SharedOutput]
    rank: int = 0
    stop: Optional[str] = None


def group_variant(shared: Sequence[SharedOutput], rank: int, count: int, sigma: float,
                  gated: bool) -> List[Optional[float]]:
    """``R^grp`` (Eq. 8), or ``R^gate`` (Eq. 9) when ``gated``, of this rank's ``count`` outputs (by position),
    over the groups of every rank's outputs: a group split across ranks is whole.

    Example: one prompt's three outputs on two ranks, TDR ``1, e, e^2`` (log TDR ``0, 1, 2``):

    >>> from ddapo.core.formulas import sequence_scores
    >>> def out(rank, position, m_text):  # |T| = |V| = 1: TDR = m^T / (1 - m^T)
    ...     scores = sequence_scores(torch.tensor([m_text]), 1, 1)
    ...     return SharedOutput(rank, position, SampleDiagnostics(scores=scores), prompt_id='q')
    >>> e = 2.718281828459045
    >>> outputs = [out(0, 0, 0.5), out(0, 1, e / (1 + e)), out(1, 0, e * e / (1 + e * e))]
    >>> [round(r, 3) for r in group_variant(outputs, rank=0, count=2, sigma=1.0, gated=False)]
    [0.294, 0.0]
    """
    groups = [s.prompt_id for s in shared]
    values = group_robust_rewards([s.log_tdr for s in shared], groups, sigma=sigma)
    if gated:
        values = gated_rewards(values, [s.correct for s in shared], groups)
    mine = {s.position: value for s, value in zip(shared, values) if s.rank == rank}
    return [mine[position] for position in range(count)]
