"""Attention entropy per modality and the modality diversity index: seed 003's AEI and MDI, normalised so that they do
not grow with ``|T|`` and ``|V|`` (DDAPO notation, section 7, Eq. 15-17). Metrics only: no reward reads them.

Pure tensor functions: no ms-swift, no model. The data flow is

    head-averaged probabilities of one layer --layer_modality_entropies--> H^X in nats    [|o_i|, 2]
    LayerCapture.masses (m^X) and .entropies (H^X), [|L_att|, |o_i|, 2]
        --modality_entropy-->  H~^X per layer and row (Eq. 15), for X in {T, V}
        --token_entropies--->  per row, the mean over the layers read; then over the rows: H~^X_i (Eq. 16)
        --diversity_index--->  MDI_i = H~^T_i / (H~^T_i + H~^V_i) (Eq. 17): `output_entropy`

Undefined values (notation section 7's table) are NaN and are left out of every mean; an output with no defined
value has NaN, which the step's metrics leave out.
"""
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

TEXT, VISION = 0, 1  # column order, as in `ddapo.core.formulas`

Counts = Union[int, torch.Tensor]  # |X| of every row, or |X_{i,t}| per row of a trajectory (notation section 6)


SMALLEST_NORMAL = 2.0 ** -126  # float32's smallest normal number: below it a probability loses digits (subnormal)


def layer_modality_entropies(head_mean: torch.Tensor, text_keys: torch.Tensor, vision_keys: torch.Tensor,
                             masses: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``H^X = -sum_{j in X} q_j log q_j`` with ``q_j = h_j / m^X`` (Eq. 15 before its division by ``log |X|``), in
    nats, per query row, for ``X = T`` (column 0) and ``V`` (column 1): ``h_j = (1/H) sum_h alpha^{(l,h)}_{s,j}`` is the
    head mean (Eq. 1's numerator) and ``m^X = sum_{j in X} h_j``; Eq. (1)'s denominator cancels in the renormalisation
    within ``X``. ``0 log 0 = 0``; NaN where ``m^X < 2^-126`` (no float32 renormalisation: section 7 leaves it out).

    ``head_mean``: ``[rows, S]`` of one layer; ``text_keys`` / ``vision_keys``: ``[S]`` boolean masks; ``masses``: the
    Eq. (1) sums of the same rows (`layer_modality_masses`), computed here when not given. Renormalised before the
    logarithm: float32's precision on the shares ``q_j``, without the cancellation of ``log m^X`` against
    ``sum_j h_j log h_j / m^X`` (an error of about ``eps |log m^X|``, 1e-6 nats at ``m^X = 1e-12``). Returns
    ``[rows, 2]`` in ``head_mean``'s dtype.
    Example: one row ``[0.5, 0.25, 0.25, 0.0]``, ``T = {0}`` (one key: 0 nats), ``V = {1, 2, 3}`` (0.5 split evenly
    over two of its keys: ``log 2``); a row with nothing on ``V``:

    >>> T, V = torch.tensor([True, False, False, False]), torch.tensor([False, True, True, True])
    >>> entropies = layer_modality_entropies(torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]]), T, V)
    >>> [[round(v, 6) for v in row] for row in entropies.tolist()], round(math.log(2), 6)
    ([[0.0, 0.693147], [0.0, nan]], 0.693147)
    """
    key_masks = torch.stack([text_keys, vision_keys], dim=1).to(head_mean)  # [S, 2]
    if masses is None:
        masses = head_mean @ key_masks
    defined = masses >= SMALLEST_NORMAL  # 1 / m^X is finite
    inverse = torch.where(defined, 1.0 / masses.clamp_min(SMALLEST_NORMAL), 0.0)  # [rows, 2]
    shares = head_mean * (inverse @ key_masks.T)  # q_j = h_j / m^X on X, 0 off T and V
    entropies = 0.0 - torch.special.xlogy(shares, shares) @ key_masks  # 0 - 0 is +0
    return torch.where(defined, entropies, torch.nan)


def per_row(count: Counts, shape: torch.Size) -> torch.Tensor:
    """A key count broadcast to ``shape`` (``[..., n]``) as float64: an int is every row's, a ``[n]`` tensor one count
    per row."""
    return torch.as_tensor(count, dtype=torch.float64).expand(shape)


def modality_entropy(mass: torch.Tensor, entropy: torch.Tensor, num_keys: Counts) -> torch.Tensor:
    """``H~^X`` of Eq. (15): the entropy of a row's attention renormalised within the key set ``X``, divided by
    ``log |X|``; in ``[0, 1]`` (1: spread evenly over ``X``'s keys, 0: on one key).

    ``mass``: ``m^X``, the Eq. (1) sums over ``X`` (a column of `LayerCapture.masses`); ``entropy``: ``H^X`` in nats
    (a column of `LayerCapture.entropies`, `layer_modality_entropies`), rounded into ``[0, log |X|]`` (float32 sums can
    land a rounding error outside); both ``[..., n]`` (any layers, ``n`` rows). ``num_keys``: ``|X|``, or per row
    ``[n]``. NaN where undefined (notation section 7): ``|X| < 2``, or ``m^X / |X| < 2^-126`` (no attention on ``X`` to
    float32 precision, ``m^X = 0`` included), or ``entropy`` NaN (a layer the capture did not fill). Returns float64.

    Example: ``H = log 4`` on 4 keys (even): 1; 0 nats: 0; ``X`` with one key, or no mass on ``X``: NaN; a mass of
    ``1e-40`` (subnormal probabilities): NaN:

    >>> mass = torch.tensor([0.4, 0.4, 0.4, 0.0, 1e-40], dtype=torch.float64)
    >>> entropy = torch.tensor([math.log(4), 0.0, 0.0, float('nan'), 1.0], dtype=torch.float64)
    >>> [round(v, 4) for v in modality_entropy(mass, entropy, torch.tensor([4, 4, 1, 4, 4])).tolist()]
    [1.0, 0.0, nan, nan, nan]
    """
    mass, entropy = mass.double(), entropy.double()
    keys = per_row(num_keys, mass.shape)
    defined = (keys >= 2) & (mass >= keys * SMALLEST_NORMAL) & ~torch.isnan(entropy)  # NaN mass compares False
    log_keys = torch.log(keys.clamp_min(2))
    normalised = torch.minimum(entropy.nan_to_num(0.0).clamp_min(0.0), log_keys) / log_keys
    return torch.where(defined, normalised, torch.nan)


def layer_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over the first dimension of the defined (non-NaN) values, NaN where there is none: Eq. (16)'s mean
    over the layers read (as Eq. 4 leaves out a layer whose value is undefined); the mean over an output's rows is the
    same function on ``[n]``.

    >>> values = torch.tensor([[0.2, float('nan'), float('nan')], [0.4, 0.6, float('nan')]], dtype=torch.float64)
    >>> [round(v, 4) for v in layer_mean(values).tolist()]
    [0.3, 0.6, nan]
    """
    defined = ~torch.isnan(values)
    count = defined.sum(dim=0)
    total = torch.where(defined, values, 0.0).sum(dim=0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.nan)


def token_entropies(masses: torch.Tensor, entropies: torch.Tensor, num_text_keys: Counts,
                    num_vision_keys: Counts) -> torch.Tensor:
    """``H~^T_{i,t}`` and ``H~^V_{i,t}`` (Eq. 16's per-token step): Eq. (15) per layer and row, averaged over the
    layers where it is defined. Returns ``[2, n]`` float64 (text, vision), NaN where no layer is defined.

    ``masses``, ``entropies``: ``[|Lambda|, n, 2]`` (`LayerCapture.masses` and `LayerCapture.entropies` at the layers
    read); the counts: ``|T|``, ``|V|``, or per row ``[n]`` (a trajectory).
    Example: 2 layers, 1 token, ``|T| = |V| = 2``; the second layer has no mass on ``V``:

    >>> masses = torch.tensor([[[0.5, 0.2]], [[0.6, 0.0]]])
    >>> entropies = torch.tensor([[[math.log(2), 0.0]], [[0.0, float('nan')]]])
    >>> token_entropies(masses, entropies, 2, 2).tolist()
    [[0.5], [0.0]]
    """
    h_text = modality_entropy(masses[..., TEXT], entropies[..., TEXT], num_text_keys)
    h_vision = modality_entropy(masses[..., VISION], entropies[..., VISION], num_vision_keys)
    return torch.stack([layer_mean(h_text), layer_mean(h_vision)])


def diversity_index(text_entropy: float, vision_entropy: float) -> float:
    """``MDI_i = H~^T_i / (H~^T_i + H~^V_i)`` of Eq. (17), in ``[0, 1]``: 0.5 when the output spreads its attention as
    evenly over ``T`` as over ``V``, above when more evenly over ``T``. NaN where either is undefined (NaN) or both
    are 0 (each modality's attention on one key: no spread to compare).

    >>> diversity_index(0.9, 0.3), diversity_index(0.3, 0.3), diversity_index(0.0, 0.0), diversity_index(math.nan, 0.5)
    (0.75, 0.5, nan, nan)
    """
    total = text_entropy + vision_entropy
    return text_entropy / total if total > 0 else math.nan  # NaN compares False


@dataclass(frozen=True)
class AttentionEntropy:
    """One output's values over a set of layers: ``MDI_i`` (Eq. 17), ``H~^T_i``, ``H~^V_i`` (Eq. 16); NaN where
    undefined (notation section 7)."""
    MDI: float
    H_T: float
    H_V: float


def output_entropy(masses: torch.Tensor, entropies: torch.Tensor, num_text_keys: Counts,
                   num_vision_keys: Counts, rows: Optional[torch.Tensor] = None) -> AttentionEntropy:
    """Eq. (16)-(17) of one output: `token_entropies`, averaged over its rows where defined (``rows``: a boolean
    ``[n]`` mask of the rows to average over, all by default; the counts stay per row of the whole output), and their
    `diversity_index`.

    Example: 2 layers, 1 token; ``|T| = 2``, ``|V| = 4``. Layer 1 puts ``0.5`` on ``T`` evenly (``H~^T = 1``) and
    ``0.4`` on ``V`` evenly (``H~^V = 1``); layer 2 puts ``0.6`` on one text key (``H~^T = 0``) and ``0.4`` on 2 of the
    4 vision keys evenly (``H~^V = log 2 / log 4 = 0.5``): ``H~^T_i = 0.5``, ``H~^V_i = 0.75``, ``MDI_i = 0.4``:

    >>> masses = torch.tensor([[[0.5, 0.4]], [[0.6, 0.4]]])
    >>> entropies = torch.tensor([[[math.log(2), math.log(4)]], [[0.0, math.log(2)]]])
    >>> e = output_entropy(masses, entropies, 2, 4)
    >>> round(e.MDI, 4), round(e.H_T, 4), round(e.H_V, 4)
    (0.4, 0.5, 0.75)
    """
    values = token_entropies(masses, entropies, num_text_keys, num_vision_keys)
    if rows is not None:
        values = values[:, rows]
    H_T, H_V = (float(layer_mean(v)) if v.numel() else math.nan for v in values)
    return AttentionEntropy(MDI=diversity_index(H_T, H_V), H_T=H_T, H_V=H_V)
