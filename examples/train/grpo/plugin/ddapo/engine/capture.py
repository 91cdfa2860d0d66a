"""Attention capture inside the language model's attention computation: the per-output records of the Eq. (1) sums,
and the eager formula evaluated for the captured query rows only. Pure torch: the attention functions that
transformers calls live on the ms-swift side (`ddapo.ms_swift.attention`) and hand each layer's probabilities here.

ms-swift's template pre-forward hook rebuilds the forward kwargs from a fixed key list, so
``output_attentions=True`` never reaches the model. Instead two attention implementations are registered with
transformers; both hand the Eq. (1) sums of the generated rows to the active `LayerCapture` as soon as a layer has
computed them, so no map outlives its layer:

- ``ddapo_eager`` (``DDAPO_ATTENTION=eager``, the reference): the modeling file's own
  ``eager_attention_forward``, the whole ``[H, S, S]`` map of each layer, bit for bit (`record_probabilities`).
- ``ddapo_rows`` (``rows`` and ``shared``): the layer's output from transformers' sdpa kernel, and the
  eager formula (``softmax(q k^T * scaling + mask)`` in float32, cast to the model dtype) evaluated for
  the captured query rows only, in chunks of at most `ROW_CHUNK_ELEMENTS` scores (`record_rows`, `eager_rows`): the
  probabilities the reward reads are the eager implementation's numbers for those rows, at a fraction of the memory.

In hybrid models (Qwen3.5) only the softmax-attention layers ``L_att`` call an attention function; their
linear-attention (Gated DeltaNet) layers never do, and have nothing to capture.
"""
from contextlib import contextmanager
from dataclasses import dataclass, field
from contextvars import ContextVar
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ddapo.core.entropy import layer_modality_entropies
from ddapo.core.formulas import head_average, key_attention_sum, layer_modality_masses
from ddapo.core.key_sets import KeySets
from ddapo.core.packing import PackMember, pack_shared_prompt

EAGER_ATTENTION = 'ddapo_eager'  # the names the ms-swift side registers the two attention functions under
ROWS_ATTENTION = 'ddapo_rows'

ROW_CHUNK_ELEMENTS = 1 << 24  # scores per chunk of rows (heads x rows x keys): ~200 MiB of temporaries at most


class LayerCapture:
    """Collects, for one output ``o_i`` during one forward, per attention layer of ``L_att`` (in depth order; the
    decoder-layer indices are ``attention_layers``): the Eq. (1) sums ``masses [|L_att|, |o_i|, 2]``, the entropies
    ``entropies [|L_att|, |o_i|, 2]`` of the attention renormalised within ``T`` and within ``V`` (Eq. 15 in nats,
    `layer_modality_entropies`: the metrics' only, never the reward's) and the per-key attention
    ``key_attention [|L_att|, P]`` (`layer_key_attention`). Linear-attention layers have no ``alpha`` and no slot.

    ``rows`` are the 0-based positions ``s_{i,t} - 1`` of the generated tokens in the forward's sequence
    (batch element ``batch_index``), whose own sequence starts at position ``start`` there (0 but for the samples
    after the first of a packed row); the key sets are cut to the prompt ``[0, P)`` of that sequence, which holds
    all of ``T`` and ``V``. Sums stay on the model's device until `finish`.

    A multi-turn trajectory (notation section 6) passes as ``rows`` the span from its first row to its last, with the
    environment's turns inside, and as ``selected`` the offsets of its rows (the trained tokens) in that span; ``P`` is
    then the last row's position, and `finish` keeps the selected rows. It also keeps ``env_masses [|L_att|, |o_i|]``,
    the Eq. (1) sums over the environment's vision keys.
    """

    def __init__(self, key_sets: KeySets, prompt_len: int, rows: range, attention_layers: Sequence[int],
                 batch_index: int = 0, keep_key_attention: bool = True, start: int = 0,
                 selected: Optional[Sequence[int]] = None):
        self.keep_key_attention = keep_key_attention  # only the report reads it: skipped otherwise, to save time
        self.start = start
        self.text_keys = key_sets.text_keys[:prompt_len]
        self.vision_keys = key_sets.vision_keys[:prompt_len]
        env = key_sets.env_vision_keys
        self.env_keys = None if env is None else env[:prompt_len]
        self.rows, self.batch_index = rows, batch_index
        self.selected = None if selected is None else torch.as_tensor(list(selected), dtype=torch.long)
        self._row_mask = None if selected is None else torch.zeros(len(rows), dtype=torch.bool).index_fill_(
            0, self.selected, True)
        self.slot = {layer: i for i, layer in enumerate(attention_layers)}  # decoder layer_idx -> row of masses
        num_layers = len(self.slot)
        self.masses = torch.full((num_layers, len(rows), 2), torch.nan, dtype=torch.float32)
        self.entropies = torch.full((num_layers, len(rows), 2), torch.nan, dtype=torch.float32)
        self.env_masses = torch.zeros((num_layers, len(rows)), dtype=torch.float32)
        self.key_attention = torch.zeros((num_layers, prompt_len), dtype=torch.float32)
        self._key_rows = torch.zeros(num_layers, dtype=torch.float32)
        self._device: Optional[torch.device] = None

    def record(self, layer_idx: int, head_mean: torch.Tensor, first_row: int = 0) -> None:
        """``head_mean``: ``[c, S_k]`` head-averaged probabilities of rows ``first_row .. first_row + c - 1`` of the
        decoder layer ``layer_idx`` (an attention layer of ``L_att``), key 0 being the sequence's ``start``."""
        layer_idx = self.slot[layer_idx]
        if self._device is None:  # one host-to-device copy per output, not one per layer (each would synchronise)
            self._device = head_mean.device
            (self.masses, self.entropies, self.env_masses, self.key_attention, self._key_rows, self.text_keys,
             self.vision_keys) = (t.to(head_mean.device) for t in (
                 self.masses, self.entropies, self.env_masses, self.key_attention, self._key_rows, self.text_keys,
                 self.vision_keys))
            if self.env_keys is not None:
                self.env_keys = self.env_keys.to(head_mean.device)
        prompt_len = self.text_keys.numel()
        on_prompt = head_mean[:, :prompt_len]
        if on_prompt.shape[1] < prompt_len:  # a chunk of a trajectory's early rows: the later keys are after them
            on_prompt = torch.nn.functional.pad(on_prompt, (0, prompt_len - on_prompt.shape[1]))
        text_keys, vision_keys = self.text_keys, self.vision_keys
        rows = slice(first_row, first_row + head_mean.shape[0])
        masses = layer_modality_masses(on_prompt, text_keys, vision_keys)
        self.masses[layer_idx, rows] = masses
        self.entropies[layer_idx, rows] = layer_modality_entropies(on_prompt, text_keys, vision_keys, masses)
        if self.env_keys is not None:
            self.env_masses[layer_idx, rows] = on_prompt @ self.env_keys.to(on_prompt.dtype)
        if not self.keep_key_attention:
            return
        if self._row_mask is not None:  # the report's per-key attention: over the trajectory's rows only
            on_prompt = on_prompt[self._row_mask[rows].to(on_prompt.device)]
        total, count = key_attention_sum(on_prompt, text_keys, vision_keys)
        self.key_attention[layer_idx] += total
        self._key_rows[layer_idx] += count

    def finish(self) -> 'LayerCapture':
        """Move the sums to the CPU (one transfer per output), turn the key sums into means, and keep a trajectory's
        rows."""
        self.key_attention = (self.key_attention / self._key_rows.clamp_min(1).unsqueeze(-1)).cpu()
        self.masses, self.entropies = self.masses.cpu(), self.entropies.cpu()
        self.env_masses, self._key_rows = self.env_masses.cpu(), self._key_rows.cpu()
        if self.selected is not None:
            self.masses, self.entropies, self.env_masses = (
                t[:, self.selected] for t in (self.masses, self.entropies, self.env_masses))
        return self


class ForwardCapture:
    """The `LayerCapture` of every output in one forward, and the decoder layers that ran through a DDAPO attention.

    ``failure``: the error text of the first exception raised while recording (`fail_active`), ``None`` while none
    was; the wrapper of the trainer's implementation catches it so that the trainer's forward runs on unchanged, and
    a failed capture is never `complete` (its sums are partial: nothing in it may be read).
    """

    def __init__(self, captures: Sequence[LayerCapture], attention_layers: Sequence[int]):
        self.captures, self.attention_layers = list(captures), list(attention_layers)
        self.layers_seen: List[int] = []
        self.failure: Optional[str] = None

    @property
    def complete(self) -> bool:
        """Nothing failed, and every attention layer of ``L_att`` ran through the DDAPO attention (other softmax
        layers, such as Gemma 3's sliding-window ones, run through it too and are not read)."""
        return self.failure is None and set(self.attention_layers) <= set(self.layers_seen)

    def finish(self) -> List[LayerCapture]:
        return [capture.finish() for capture in self.captures]


# The active capture of the forward running now, set and reset by `capturing` around it. transformers calls an
# attention function with the layer's tensors and the forward's kwargs, and ms-swift's template hook rebuilds those
# kwargs from a fixed key list (why output_attentions never arrives), so a forward kwarg cannot carry the capture.
_ACTIVE: ContextVar[Optional[ForwardCapture]] = ContextVar('ddapo_active_capture', default=None)


def _active_for(layer_idx: int) -> Optional['ForwardCapture']:
    """The active capture if decoder layer ``layer_idx`` is one of ``L_att`` to capture and the capture has not failed.
    Every layer that runs through a DDAPO attention is noted, for the completeness check."""
    active = _ACTIVE.get()
    if active is None:
        return None
    active.layers_seen.append(layer_idx)
    if active.failure is not None:  # its sums are not read: the later layers skip the work
        return None
    return active if active.captures and layer_idx in active.captures[0].slot else None


def fail_active(layer_idx: int, error: BaseException) -> None:
    """Mark the active capture failed at decoder layer ``layer_idx`` with ``error`` (the first failure is kept);
    nothing when no capture is active."""
    active = _ACTIVE.get()
    if active is not None and active.failure is None:
        active.failure = f'layer {layer_idx}: {type(error).__name__}: {error}'


def record_probabilities(layer_idx: int, attn_weights: torch.Tensor, key_len: int, query_len: int) -> None:
    """Hand a layer's whole eager map ``attn_weights [B, H, S_q, S_k]`` to the active captures (the reference path)."""
    active = _active_for(layer_idx)
    if active is None:
        return
    offset = key_len - query_len
    for capture in active.captures:
        rows = slice(capture.rows.start - offset, capture.rows.stop - offset)
        capture.record(layer_idx, head_average(attn_weights[capture.batch_index, :, rows, capture.start:]))


def record_rows(layer_idx: int, query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor],
                scaling: float, groups: int = 1) -> None:
    """Evaluate the eager formula for the captured rows of the active captures (`eager_rows`), chunked, and hand
    them over; ``groups``: query heads per key/value head."""
    active = _active_for(layer_idx)
    if active is None:
        return
    offset = key.shape[2] - query.shape[2]
    chunk = max(1, ROW_CHUNK_ELEMENTS // (query.shape[1] * key.shape[2]))
    for capture in active.captures:
        for first in range(0, len(capture.rows), chunk):
            positions = capture.rows[first:first + chunk]
            rows = slice(positions.start - offset, positions.stop - offset)
            probabilities = eager_rows(query, key, attention_mask, capture.batch_index, rows, scaling, groups,
                                       capture.start)
            capture.record(layer_idx, head_average(probabilities), first)


def eager_rows(query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor], batch_index: int,
               rows: slice, scaling: float, groups: int = 1, key_start: int = 0) -> torch.Tensor:
    """``eager_attention_forward``'s probabilities for the query rows ``rows`` of one batch element over the keys from
    ``key_start`` on: ``[H, c, S']``.

    The same operations as eager (``q k^T * scaling``, the mask, softmax accumulated in float32 and
    rounded to the query dtype), on a slice of the queries. The mask is what the layer received:

    - a 4D mask, boolean (``True`` attends) or additive float (eager's own): applied as it is;
    - a 2D padding mask ``[B, S_k]`` (flash attention's on a padded micro-batch): keys where it is 0 are padding and
      left out, and the causal rule below applies;
    - ``None`` (sdpa's plain causal sequence, flash attention's unpadded or packed rows): the causal rule alone.

    The causal rule: keys after the chunk's last row, masked for every row, are left out (``S'`` ends at the last
    row's position) and the causal mask is applied to the chunk's own diagonal block. ``key_start``: where the rows'
    own sequence starts (a packed row's later samples, a left-padded sample's pad count); keys before it belong to
    other sequences or are padding, and are left out (with a 4D mask they are masked anyway).

    Example: equal scores, so the keys a row attends share its attention evenly; the last of 4 rows under no
    mask, left-padded by 2 (2D mask), and the second row of a right-padded one (the pad keys are after it):

    >>> q, k = torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2)
    >>> eager_rows(q, k, None, 0, slice(3, 4), 1.0).tolist()
    [[[0.25, 0.25, 0.25, 0.25]]]
    >>> eager_rows(q, k, torch.tensor([[False, False, True, True]]), 0, slice(3, 4), 1.0).tolist()
    [[[0.0, 0.0, 0.5, 0.5]]]
    >>> eager_rows(q, k, torch.tensor([[True, True, False, False]]), 0, slice(1, 2), 1.0).tolist()
    [[[0.5, 0.5]]]
    """
    keys = key[batch_index]  # [H_kv, S_k, D]
    first, last = rows.start, rows.stop - 1  # query indices
    offset = key.shape[2] - query.shape[2]  # queries are the last positions (a cache holds the first ones)
    causal = attention_mask is None or attention_mask.dim() == 2  # no 4D mask: the causal rule is applied here
    keys = keys[:, key_start:last + offset + 1] if causal else keys[:, key_start:]
    keys = keys.repeat_interleave(groups, dim=0)  # [H, S', D]: each key/value head serves `groups` query heads
    scores = torch.matmul(query[batch_index, :, rows], keys.transpose(1, 2)).mul_(scaling)  # [H, c, S']
    if causal:
        # keys up to the first row's position are open to every row; only the block after it is causal
        lo = first + offset + 1 - key_start
        positions = torch.arange(first + offset - key_start, last + offset + 1 - key_start, device=key.device)
        allowed = torch.arange(lo, keys.shape[1], device=key.device) <= positions.unsqueeze(-1)
        scores[..., lo:].masked_fill_(~allowed, torch.finfo(scores.dtype).min)
        if attention_mask is not None:
            if attention_mask.shape[-1] != key.shape[2]:  # flash hands a shorter one with a static cache only
                raise ValueError(f'a 2D mask over {attention_mask.shape[-1]} keys for {key.shape[2]} keys')
            padding = attention_mask[batch_index, key_start:last + offset + 1] == 0  # [S'], bool or integer mask
            scores.masked_fill_(padding, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores.masked_fill_(~attention_mask[batch_index, :, rows, key_start:], torch.finfo(scores.dtype).min)
    else:
        scores.add_(attention_mask[batch_index, :, rows, key_start:])
    # softmax accumulates in float32 for half inputs and rounds once on writing: eager's numbers without
    # eager's float32 copy of the scores
    return torch.softmax(scores, dim=-1)


@contextmanager
def capturing(capture: ForwardCapture) -> Iterator[ForwardCapture]:
    """Route the DDAPO attention layers of forwards run inside this block to ``capture``."""
    token = _ACTIVE.set(capture)
    try:
        yield capture
    finally:
        _ACTIVE.reset(token)


@dataclass
class CapturedForward:
    """One forward's model outputs, its `ForwardCapture` (``finish()`` gives the per-output `LayerCapture`), the
    length of the sequence it ran and its kwargs. ``logits_from``: the first row whose logits the model returned
    (``keep_logits``), ``None`` when only the last row's."""
    model_outputs: Any
    capture: ForwardCapture
    length: int
    kwargs: Dict[str, Any] = field(default_factory=dict, repr=False)
    logits_from: Optional[int] = None


def forward_inputs(members: Sequence[PackMember], pack: bool) -> Tuple[Dict[str, Any], List[range]]:
    """The forward kwargs of one or several outputs, and the rows ``s_{g,t} - 1`` of each output in it.

    ``pack``: the outputs share their prompt and run as ``[q ; o_1 ; ... ; o_G]`` (`pack_shared_prompt`);
    otherwise there is exactly one output, run on its own sequence ``[q ; o_i]``.
    """
    if pack:
        kwargs, rows = pack_shared_prompt([m.forward_kwargs for m in members], members[0].prompt_len,
                                          [m.num_generated for m in members])
    elif len(members) != 1:
        raise ValueError(f'{len(members)} outputs in one forward need pack=True')
    else:
        member = members[0]
        kwargs, rows = member.forward_kwargs, [range(member.prompt_len, member.prompt_len + member.num_generated)]
    check_rows(kwargs['input_ids'], rows, members)
    return kwargs, rows


def check_rows(input_ids: torch.Tensor, rows: Sequence[range], members: Sequence[PackMember]) -> None:
    """The structural check of the reward's own forwards, before anything is read: the forward's ids at each output's
    rows are the ids its encoding located there (``input_ids[P : P + |o_i|]`` of the member, which `locate_completion`
    matched with the generated ids); a member without its encoding's ids (a bare `Member`) is not checked. Raises
    ValueError: the unit is then a counted None (``reward_forward_failed``), never a number read at the wrong place.

    >>> from types import SimpleNamespace
    >>> member = SimpleNamespace(input_ids=[7, 8, 1, 2], prompt_len=2, num_generated=2)
    >>> check_rows(torch.tensor([[7, 8, 1, 2]]), [range(2, 4)], [member])
    >>> check_rows(torch.tensor([[7, 8, 1, 9]]), [range(2, 4)], [member])
    Traceback (most recent call last):
    ...
    ValueError: the forward's ids at an output's rows are not the ids its encoding holds there
    """
    for member, rows_of in zip(members, rows):
        ids = getattr(member, 'input_ids', None)
        if ids is None:
            continue
        expected = list(ids[member.prompt_len:member.prompt_len + member.num_generated])
        if input_ids[0, rows_of.start:rows_of.stop].tolist() != expected:
            raise ValueError('the forward\'s ids at an output\'s rows are not the ids its encoding holds there')


def captured_forward(forward, members: Sequence[PackMember], key_sets: Sequence[KeySets],
                     attention_layers: Sequence[int], pack: bool,
                     key_attention: Optional[Sequence[bool]] = None, keep_logits: bool = False) -> CapturedForward:
    """One forward for one or several outputs (``members[g]``'s sequence ``[q ; o_g]``, with key sets ``key_sets[g]``),
    laid out by `forward_inputs`.

    ``key_attention``: per output, whether to keep `LayerCapture.key_attention` (default: for none).
    ``keep_logits``: the model returns the logits of every row from the first output's first row on (validation
    steps, Eq. 12), instead of the last row's only; attention, and so every captured number, is the same.
    """
    kwargs, rows = forward_inputs(members, pack)
    length = int(kwargs['input_ids'].shape[-1])
    logits_from = None
    if keep_logits:  # logits_to_keep=0 would mean every row: at least one
        logits_from = min(min(r.start for r in rows), length - 1)
        kwargs = {**kwargs, 'logits_to_keep': length - logits_from}
    keep = key_attention or [False] * len(members)
    captures = ForwardCapture([LayerCapture(k, m.key_len, r, attention_layers, keep_key_attention=want,
                                            selected=m.selected)
                               for m, k, r, want in zip(members, key_sets, rows, keep)], attention_layers)
    with capturing(captures):
        outputs = forward(**kwargs)
    return CapturedForward(outputs, captures, length, kwargs, logits_from)
