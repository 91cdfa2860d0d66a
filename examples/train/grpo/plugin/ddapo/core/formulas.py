"""DDAPO attention-balance formulas, Eq. (1)-(7) of the DDAPO notation (docs/notation.md in this repository); the group
variants, Eq. (8)-(9), are in `ddapo.core.variants`, the token weights, Eq. (10)-(11), in `ddapo.core.token_weights`.

Pure tensor functions: no ms-swift, no model. The data flow is

    attention probabilities of one layer --head_average, layer_modality_masses--> [|o_i|, 2]   (Eq. 1 sums)
    stacked over the layers Lambda     --token_text_mass-------->  m^T_{i,t}    (Eq. 1 + Eq. 4)
    m^T_{i,t}, |T|, |V|                --sequence_scores-------->  M^T_i, rho_text_i, rho_vis_i, TDR_i,
                                                                   eta^X_i, R^bal_i (Eq. 2, 3, 5, 6, 7)
    TDR_i of a prompt's outputs        --variants.group_robust_rewards-->  R^grp_i (Eq. 8), R^gate_i (Eq. 9)
    m^T_{i,t}, |T|, |V|                --token_weights.token_weights---->  TDR_{i,t} (Eq. 10), w_{i,t} (Eq. 11)

Cases where a value is undefined (notation, section 4) raise `NotApplicable` with a short reason
code; the caller turns that into `None` for GRPO and counts the reason.
"""
import math
from dataclasses import dataclass
from typing import List, Tuple, Union

import torch

TEXT, VISION = 0, 1  # column order of the per-layer masses


class NotApplicable(ValueError):
    """The reward is undefined for this output (notation section 4); ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str = ''):
        super().__init__(f'{reason}: {detail}' if detail else reason)
        self.reason, self.detail = reason, detail


def head_average(attention: torch.Tensor) -> torch.Tensor:
    """``(1/H) sum_h alpha^{(l,h)}_{s,j}`` of Eq. (1): ``[H, rows, S]`` probabilities to ``[rows, S]`` float32."""
    return attention.mean(dim=0, dtype=torch.float32)


def layer_modality_masses(head_mean: torch.Tensor, text_keys: torch.Tensor, vision_keys: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention mass on the text and vision keys, per query row: the sums of Eq. (1).

    ``head_mean``: ``[|o_i|, S]`` from `head_average` of one layer, rows ``s_{i,t}`` only;
    ``text_keys`` / ``vision_keys``: ``[S]`` boolean masks of ``T`` and ``V``.
    Returns ``[|o_i|, 2]``: column 0 is ``sum_{j in T} (1/H) sum_h alpha``, column 1 the same over ``V``.

    Example: one row ``[0.5, 0.3, 0.2]``, ``T = {0}``, ``V = {1}`` (key 2, e.g. a special token, is in neither set):

    >>> T, V = torch.tensor([True, False, False]), torch.tensor([False, True, False])
    >>> layer_modality_masses(torch.tensor([[0.5, 0.3, 0.2]]), T, V).double().round(decimals=4).tolist()
    [[0.5, 0.3]]
    """
    key_masks = torch.stack([text_keys, vision_keys], dim=1).to(head_mean)  # [S, 2]
    return head_mean @ key_masks


def key_attention_sum(head_mean: torch.Tensor, text_keys: torch.Tensor,
                      vision_keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. (1) per key ``j`` (``a^{(l)}_{i,t,j}``, 0 off ``T or V``) summed over the rows, and how many rows count.

    Rows whose Eq. (1) denominator is 0 are left out. Returns ``([S], count)``; the sum of several row
    chunks divided by the sum of their counts is `layer_key_attention` of all the rows.
    Example: rows ``[[0.5, 0.3, 0.2], [0.0, 0.0, 1.0]]``, ``T = {0}``, ``V = {1}`` (row 2 left out):

    >>> T, V = torch.tensor([True, False, False]), torch.tensor([False, True, False])
    >>> total, count = key_attention_sum(torch.tensor([[0.5, 0.3, 0.2], [0.0, 0.0, 1.0]]), T, V)
    >>> [round(v, 4) for v in total.tolist()], int(count)
    ([0.625, 0.375, 0.0], 1)
    """
    keys = (text_keys | vision_keys).to(head_mean)
    on_keys = head_mean * keys
    denominator = on_keys.sum(dim=-1, keepdim=True)
    valid = denominator.squeeze(-1) > 0
    total = (on_keys / denominator.clamp_min(torch.finfo(on_keys.dtype).tiny) * valid.unsqueeze(-1)).sum(dim=0)
    return total, valid.sum()


def layer_key_attention(head_mean: torch.Tensor, text_keys: torch.Tensor, vision_keys: torch.Tensor) -> torch.Tensor:
    """``(1/|o_i|) sum_t a^{(l)}_{i,t,j}``: Eq. (1) per key ``j``, averaged over the generated tokens; 0 off ``T or V``.

    Returns ``[S]``; sums to 1 over ``T or V`` (rows whose Eq. (1) denominator is 0 are left out). Drives the
    heat maps: its values on ``V``, laid back onto the image grid, show where in the image the output looked.
    Example: rows ``[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]``, ``T = {0}``, ``V = {1}``:

    >>> T, V = torch.tensor([True, False, False]), torch.tensor([False, True, False])
    >>> [round(v, 4) for v in layer_key_attention(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]), T, V).tolist()]
    [0.5625, 0.4375, 0.0]
    """
    total, count = key_attention_sum(head_mean, text_keys, vision_keys)
    return total / count if int(count) > 0 else torch.zeros_like(total)


def token_text_mass(layer_masses: torch.Tensor) -> torch.Tensor:
    """``m^T_{i,t}`` of Eq. (4): Eq. (1)'s renormalised text share, averaged over the layers read.

    ``layer_masses``: ``[|Lambda|, |o_i|, 2]`` from `layer_modality_masses`, one slice per layer of ``Lambda``.
    A layer whose Eq. (1) denominator is 0 for a token is left out of that token's mean (notation
    section 4); a token with no such layer at all gets NaN. ``m^V_{i,t} = 1 - m^T_{i,t}``.

    Example: two layers giving a token masses ``[0.6, 0.2]`` and ``[0.1, 0.1]`` give
    ``m^T = (0.75 + 0.5) / 2 = 0.625``:

    >>> m_text = token_text_mass(torch.tensor([[[0.6, 0.2]], [[0.1, 0.1]]]))  # [|Lambda| = 2, |o_i| = 1, 2]
    >>> [round(v, 6) for v in m_text.tolist()]
    [0.625]
    """
    return _layer_share(layer_masses, layer_masses[..., TEXT])


def _layer_share(layer_masses: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``part / (text + vision)`` per layer and row, averaged over the layers whose denominator is positive."""
    layer_masses = layer_masses.double()
    denominator = layer_masses.sum(dim=-1)  # [|Lambda|, |o_i|]
    valid = denominator > 0
    share = torch.where(valid, part.double() / denominator.clamp_min(torch.finfo(torch.float64).tiny), 0.)
    count = valid.sum(dim=0)
    return torch.where(count > 0, share.sum(dim=0) / count.clamp_min(1), torch.nan)


def token_env_vision_mass(layer_masses: torch.Tensor, env_masses: torch.Tensor) -> torch.Tensor:
    """``m^{V,env}_{i,t}`` (notation section 6): the part of ``m^V_{i,t}`` on the vision keys of the environment's
    turns, renormalised and averaged over the layers as Eq. (4) does; ``m^V = m^{V,prompt} + m^{V,env}``.

    ``env_masses``: ``[|Lambda|, |o_i|]``, the Eq. (1) sums over ``V_env`` (a subset of ``V``). Example: a token putting
    ``(0.6, 0.2)`` on ``(T, V)``, ``0.15`` of it on an environment image: ``m^{V,env} = 0.15 / 0.8``:

    >>> [round(v, 6) for v in token_env_vision_mass(torch.tensor([[[0.6, 0.2]]]), torch.tensor([[0.15]])).tolist()]
    [0.1875]
    """
    return _layer_share(layer_masses, env_masses)


@dataclass(frozen=True)
class DDAPOScores:
    """Sequence-level quantities of one output ``o_i`` (notation section 3)."""
    num_text_keys: int  # |T|
    num_vision_keys: int  # |V|
    num_tokens: int  # |o_i| tokens whose m^T is defined
    M_text: float  # M^T_i, Eq. (5)
    M_vis: float  # M^V_i = 1 - M^T_i
    rho_text: float  # Eq. (2)
    rho_vis: float  # Eq. (2)
    tdr: float  # TDR_i, Eq. (3); inf when M^V_i = 0
    eta_text: float  # eta^T_i, Eq. (6)
    eta_vis: float  # eta^V_i, Eq. (6)
    reward_balance: float  # R^bal_i, Eq. (7)


Counts = Union[int, torch.Tensor]  # |T| (|V|) of every row, or |T_{i,t}| (|V_{i,t}|) per row of a trajectory


def per_row(count: Counts, n: int) -> torch.Tensor:
    """A key count as ``[n]`` float64: an int is every row's (one turn), a tensor one count per row (notation
    section 6)."""
    return torch.as_tensor(count, dtype=torch.float64).expand(n) if not torch.is_tensor(count) else count.double()


def total(count: Counts) -> int:
    """``|T|`` (``|V|``) of the output: the int, or the most any row sees (the last row's, in a trajectory)."""
    if not torch.is_tensor(count):
        return int(count)
    return int(count.max()) if count.numel() else 0


def scored_rows(m_text: torch.Tensor, num_text_keys: Counts, num_vision_keys: Counts) -> torch.Tensor:
    """The rows Eq. (2)-(7) average over: ``m^T_{i,t}`` defined, and at least one text and one vision key before the
    row (a trajectory's row that sees no image yet has no balance to measure: ``m^V = 0`` by construction).

    >>> scored_rows(torch.tensor([1.0, float('nan'), 0.4]), torch.tensor([3, 3, 5]), torch.tensor([0, 2, 2])).tolist()
    [False, False, True]
    """
    n = m_text.numel()
    return ~torch.isnan(m_text) & (per_row(num_text_keys, n) > 0) & (per_row(num_vision_keys, n) > 0)


def check_applicable(m_text: torch.Tensor, num_text_keys: Counts, num_vision_keys: Counts) -> None:
    """Raise `NotApplicable` where an output's reward is undefined (notation section 4): ``|V| = 0``
    (``no_vision_keys``), ``|T| = 0`` (``no_text_keys``), ``|o_i| = 0`` (``empty_completion``), or no token with a
    defined ``m^T`` (``no_prompt_attention``). With per-row counts (a trajectory), ``|V|`` is what the last row sees:
    a text-only trajectory is ``no_vision_keys``; and the rows must include one that sees both kinds of key.

    Example: a text-only prompt (``|V| = 0``):

    >>> try:
    ...     check_applicable(torch.tensor([0.5]), 3, 0)
    ... except NotApplicable as error:
    ...     error.reason
    'no_vision_keys'
    """
    if total(num_vision_keys) == 0:
        raise NotApplicable('no_vision_keys', 'the prompt has no image or video token (|V| = 0)')
    if total(num_text_keys) == 0:
        raise NotApplicable('no_text_keys', 'the prompt has no text key outside special tokens and system turn')
    if m_text.numel() == 0:
        raise NotApplicable('empty_completion', '|o_i| = 0')
    if not bool(scored_rows(m_text, num_text_keys, num_vision_keys).any()):
        raise NotApplicable('no_prompt_attention', 'no generated token attends to a text or vision key')


def balance_reward(rho_text: float, rho_vis: float) -> float:
    """``R^bal_i = rho_vis_i / (rho_text_i + rho_vis_i) = 1 / (1 + TDR_i)``, Eq. (7), in ``[0, 1]``.

    ``rho_text + rho_vis > 0`` always holds where it is called: ``M^T + M^V = 1`` (`sequence_scores`).
    Example: ``rho_text = 0.03``, ``rho_vis = 0.01`` (``TDR = 3``); ``rho_vis = 0``:

    >>> round(balance_reward(0.03, 0.01), 6), balance_reward(0.03, 0.0)
    (0.25, 0.0)
    """
    return rho_vis / (rho_text + rho_vis)


def sequence_scores(m_text: torch.Tensor, num_text_keys: Counts, num_vision_keys: Counts) -> DDAPOScores:
    """Eq. (2), (3), (5), (6), (7) from the per-token text masses ``m^T_{i,t}`` (NaN tokens are left out).

    ``num_text_keys`` / ``num_vision_keys``: ``|T|`` and ``|V|``, or in a trajectory ``[|o_i|]`` tensors of the keys
    each row sees (notation section 6): then ``rho_text_i`` is the mean over the rows of ``m^T_{i,t} / |T_{i,t}|``
    (``rho_vis_i``, ``eta`` likewise), which is Eq. (2) and (6) when every row sees the same keys, and the rows that
    see no vision key yet are left out (`scored_rows`). Raises `NotApplicable` where the reward is undefined
    (`check_applicable`).

    Example: ``m^T = [0.8, 0.6]``, ``|T| = 10``, ``|V| = 30``:

    >>> s = sequence_scores(torch.tensor([0.8, 0.6]), num_text_keys=10, num_vision_keys=30)
    >>> [round(v, 4) for v in (s.M_text, s.rho_text, s.rho_vis, s.tdr, s.eta_text, s.eta_vis, s.reward_balance)]
    [0.7, 0.07, 0.01, 7.0, 2.8, 0.4, 0.125]
    >>> s.num_text_keys, s.num_vision_keys, s.num_tokens
    (10, 30, 2)

    A trajectory: the first row sees no image yet (left out); the next two see 10 text keys, and 30 then 60 vision
    keys: ``rho_vis = (0.2 / 30 + 0.4 / 60) / 2``:

    >>> s = sequence_scores(torch.tensor([1.0, 0.8, 0.6]), torch.tensor([8, 10, 10]), torch.tensor([0, 30, 60]))
    >>> round(s.rho_text, 4), round(s.rho_vis, 6), s.num_vision_keys, s.num_tokens
    (0.07, 0.006667, 60, 2)
    """
    check_applicable(m_text, num_text_keys, num_vision_keys)
    rows = scored_rows(m_text, num_text_keys, num_vision_keys)
    defined = m_text[rows].double()
    M_text = float(defined.mean())
    M_vis = 1.0 - M_text
    if torch.is_tensor(num_text_keys) or torch.is_tensor(num_vision_keys):  # notation section 6
        n = m_text.numel()
        text, vision = per_row(num_text_keys, n)[rows], per_row(num_vision_keys, n)[rows]
        rho_text, rho_vis = float((defined / text).mean()), float(((1.0 - defined) / vision).mean())
        eta_text = float((defined * (text + vision) / text).mean())
        eta_vis = float(((1.0 - defined) * (text + vision) / vision).mean())
    else:
        rho_text, rho_vis = M_text / num_text_keys, M_vis / num_vision_keys
        share_text = num_text_keys / (num_text_keys + num_vision_keys)
        eta_text, eta_vis = M_text / share_text, M_vis / (1.0 - share_text)
    return DDAPOScores(
        num_text_keys=total(num_text_keys),
        num_vision_keys=total(num_vision_keys),
        num_tokens=int(defined.numel()),
        M_text=M_text,
        M_vis=M_vis,
        rho_text=rho_text,
        rho_vis=rho_vis,
        tdr=rho_text / rho_vis if rho_vis > 0 else math.inf,
        eta_text=eta_text,
        eta_vis=eta_vis,
        reward_balance=balance_reward(rho_text, rho_vis),
    )


def layer_set(num_layers: int, spec: str = 'last:8') -> List[int]:
    """The layers ``Lambda`` read, as 0-based positions in the attention layers ``L_att`` (``num_layers = |L_att|``,
    which is ``L`` in a model without linear-attention layers): ``last:K`` (all when ``|L_att| < K``), ``all``, or a
    third.

    Thirds per the notation (attention layers numbered from 1, ``n = |L_att|``): ``early = 1..floor(n/3)``,
    ``middle = floor(n/3)+1..floor(2n/3)``, ``late = floor(2n/3)+1..n``.
    Example: ``n = 28``: ``last:8`` is ``[20..27]``, ``early`` is ``[0..8]``, ``late`` is ``[18..27]``; Qwen3.5-27B
    (64 decoder layers, every fourth softmax attention, ``n = 16``): ``last:8`` is positions ``[8..15]``, the decoder
    layers ``[35, 39, ..., 63]``.
    """
    if num_layers <= 0:
        raise ValueError(f'num_layers must be positive, got {num_layers}')
    if spec == 'all':
        return list(range(num_layers))
    if spec.startswith('last:'):
        k = int(spec[len('last:'):])
        if k <= 0:
            raise ValueError(f'last:K needs K >= 1, got {spec!r}')
        return list(range(max(0, num_layers - k), num_layers))
    a, b = num_layers // 3, (2 * num_layers) // 3
    thirds = {'early': range(0, a), 'middle': range(a, b), 'late': range(b, num_layers)}
    if spec not in thirds:
        raise ValueError(f"layer set must be 'last:K', 'all', 'early', 'middle' or 'late', got {spec!r}")
    return list(thirds[spec])
