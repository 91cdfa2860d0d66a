"""Token weights, Eq. (10) and (11) of the notation (docs/notation.md, section 3): the per-token ratio ``TDR_{i,t}``
and the weights ``w_{i,t}`` multiplied into the GRPO advantages (``DDAPO_TOKEN_WEIGHTS=1``), with their smoothing and
their clipping at mean 1. Pure torch; ``m^T_{i,t}`` comes from `ddapo.core.formulas.token_text_mass`.
"""
import math
from typing import Optional, Tuple

import torch

from ddapo.core.formulas import Counts, check_applicable, per_row
from ddapo.core.variants import TDR_BOUND

def token_tdr(m_text: torch.Tensor, num_text_keys: Counts, num_vision_keys: Counts) -> torch.Tensor:
    """``TDR_{i,t} = (m^T_{i,t} * |V|) / (m^V_{i,t} * |T|)`` of Eq. (10), clipped to ``[1e-6, 1e6]`` (`TDR_BOUND`) so a
    token with ``m^T = 0`` or ``m^V = 0`` stays finite; NaN (undefined ``m^T``) stays NaN. In a trajectory the counts
    are each row's (``|T_{i,t}|``, ``|V_{i,t}|``), and a row that sees no text or no vision key gets NaN.

    Example: ``m^T = [0.5, 0.75, 1.0]``, ``|T| = |V|`` (the last token's ``m^V = 0`` is clipped):

    >>> token_tdr(torch.tensor([0.5, 0.75, 1.0]), 7, 7).tolist()
    [1.0, 3.0, 1000000.0]
    """
    m_text = m_text.double()
    text, vision = per_row(num_text_keys, m_text.numel()), per_row(num_vision_keys, m_text.numel())
    ratio = (m_text * vision) / ((1.0 - m_text) * text)  # m^V = 0 gives inf, clipped below
    return torch.where((text > 0) & (vision > 0), ratio.clamp(1.0 / TDR_BOUND, TDR_BOUND), torch.nan)


def gaussian_smooth(values: torch.Tensor, sigma: float, defined: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``values`` smoothed along the completion with a Gaussian kernel of standard deviation ``sigma`` tokens, cut at
    ``3 sigma``: each token gets the kernel-weighted mean of the ``defined`` tokens (default all) within reach, so the
    ends and undefined tokens take no weight and a constant stays constant. ``sigma = 0`` returns ``values``.

    Example: ``[0, 3, 0]`` with ``sigma = 1``; token 0 is ``3 e^{-1/2} / (1 + e^{-1/2} + e^{-2})``:

    >>> [round(v, 4) for v in gaussian_smooth(torch.tensor([0.0, 3.0, 0.0]), 1.0).tolist()]
    [1.0446, 1.3556, 1.0446]
    """
    if sigma <= 0 or values.numel() < 2:
        return values
    defined = torch.ones_like(values, dtype=torch.bool) if defined is None else defined
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2)).view(1, 1, -1)
    present = defined.double()
    total = torch.nn.functional.conv1d(
        torch.nn.functional.pad((torch.nan_to_num(values.double()) * present).view(1, 1, -1), (radius, radius)), kernel)
    weight = torch.nn.functional.conv1d(torch.nn.functional.pad(present.view(1, 1, -1), (radius, radius)), kernel)
    return (total / weight).view(-1)


def mean_one_clip(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``w_t = clip(c * values_t, low, high)`` with the scale ``c > 0`` for which ``mean_t w_t = 1``.

    ``values`` are positive; ``low <= 1 <= high`` makes ``c`` exist (``mean clip(c v)`` rises continuously from ``low``
    to ``high`` as ``c`` grows). Clipping after a plain division by the mean would move the mean off 1; the scale is
    found by bisection on ``log c`` (to float precision).

    Example: ``[9, 1/9]`` with bounds ``(0.2, 3)``: ``c = 0.2`` (plain normalisation would give
    ``[1.9756, 0.0244]``, then ``[1.9756, 0.2]``, mean 1.0878):

    >>> [round(v, 4) for v in mean_one_clip(torch.tensor([9.0, 1 / 9]), 0.2, 3.0).tolist()]
    [1.8, 0.2]
    """
    if not 0 <= low <= 1 <= high:
        raise ValueError(f'clip bounds must satisfy 0 <= low <= 1 <= high, got ({low}, {high})')
    values = values.double()
    n = values.numel()

    def mean_at(log_c: float) -> float:
        return float((values * math.exp(log_c)).clamp(low, high).mean())

    guess = math.log(n / float(values.sum()))  # plain normalisation; often already inside the bounds
    lo, hi = guess, guess
    while mean_at(lo) > 1:
        lo -= 1.0
    while mean_at(hi) < 1:
        hi += 1.0
    for _ in range(60):  # the bracket is a few units of log c wide; 60 halvings reach float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_at(mid) < 1 else (lo, mid)
    return (values * math.exp(hi)).clamp(low, high)


def token_weights(m_text: torch.Tensor, num_text_keys: Counts, num_vision_keys: Counts,
                  clip: Tuple[float, float] = (0.2, 3.0), sigma: float = 0.0,
                  follows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. (11) weights ``w_{i,t}`` of the log-probabilities of one output's generated tokens, from the ratio of
    Eq. (10): a token chosen while the model leaned on the image weighs more. Returns ``[|o_i|]`` float64.

    ``o_{i,t}`` is chosen by the query row before it, so its weight comes from that row's ratio ``TDR_{i,t-1}``
    (`token_tdr`); ``o_{i,1}`` is chosen by the prompt's last row, which the reward does not read, and gets
    ``w_{i,1} = 1``. For ``t >= 2``: ``r_t = 1 / TDR_{i,t-1}``; ``sigma > 0`` smooths ``r`` along the completion
    (`gaussian_smooth`, ``sigma`` in tokens); ``w_t = clip(c * r_t, low, high)`` with ``c`` such that the mean of
    ``w`` over these tokens is 1 (`mean_one_clip`), so the weights move the output's advantage between its tokens
    without changing its total. A row whose ``m^T`` is undefined (notation section 4) gives ``w = 1`` and stays
    out of the smoothing and the mean. Raises `NotApplicable` where `sequence_scores` does (`check_applicable`).

    A trajectory (notation section 6) gives per-row counts and ``follows``: ``[|o_i|]`` bool, whether the row before
    each row's position is a row (the first row of every generated turn follows the turn's header, not a row, and gets
    ``w = 1`` like ``o_{i,1}``). A row that sees no vision key yet gives ``w = 1`` to the token after it.

    Example: ``m^T = [0.5, 0.75, 0.9]``, ``|T| = |V|``: rows 1 and 2 give ``TDR = [1, 3]``, ``r = [1, 1/3]``
    (row 3 chose the token after the output):

    >>> [round(v, 4) for v in token_weights(torch.tensor([0.5, 0.75, 0.9]), 4, 4).tolist()]
    [1.0, 1.5, 0.5]
    """
    check_applicable(m_text, num_text_keys, num_vision_keys)
    n = m_text.numel()
    weights = torch.ones(n, dtype=torch.float64)
    text, vision = per_row(num_text_keys, n)[:-1], per_row(num_vision_keys, n)[:-1]
    ratio = 1.0 / token_tdr(m_text[:-1], text, vision)  # row t-1 chose token t
    defined = ~torch.isnan(ratio) & (torch.ones_like(ratio, dtype=torch.bool) if follows is None else follows[1:])
    if bool(defined.any()):
        weights[1:][defined] = mean_one_clip(gaussian_smooth(ratio, sigma, defined)[defined], *clip)
    return weights
