"""One forward for the outputs of one prompt: ``[q ; o_1 ; ... ; o_G]`` with a tree-shaped attention mask.

``DDAPO_ATTENTION=shared`` runs the shared prompt ``q`` (text and images, so the vision tower too) once
and every output against it: ``o_g``'s tokens attend to ``q`` and to ``o_g``'s own earlier tokens, and
keep the positions (rotary ids included) they have in ``[q ; o_g]``. Each generated row therefore
sees exactly the keys and positions it sees in its own sequence, and its Eq. (1) sums are the same.

`micro_batch_placements` maps the samples of a micro-batch the trainer collated (right- or left-padded, or packed
under ``--padding_free``) to their rows, for the capture inside the trainer's own forward; `misplaced` checks a
placement against the sample's own ids before anything is read there.

Pure torch on the Hugging Face forward kwargs (``input_ids``, ``attention_mask``, ``position_ids``,
``mm_token_type_ids``, pixel tensors): no ms-swift.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

# Tensors along the sequence, last dimension: cut to the prompt, then each output's generated part appended.
SEQUENCE_KEYS = ('input_ids', 'position_ids', 'text_position_ids', 'mm_token_type_ids', 'image_token_types')
# Varlen packing metadata (flash-attention): the explicit 4D mask replaces it, so it is dropped.
DROPPED_KEYS = ('cu_seq_lens_q', 'cu_seq_lens_k', 'max_length_q', 'max_length_k')


class PackMember(Protocol):
    """One output's single-sequence forward: ``[q ; o_i]`` (batch size 1), ``P`` and ``|o_i|`` (``EncodedCompletion``
    is one). A multi-turn trajectory (notation section 6) is never packed: ``num_generated`` is the span from its first
    row to its last, ``selected`` its rows' offsets in that span (None for one turn), and ``key_len`` the position
    before which its keys lie (``P`` for one turn)."""
    forward_kwargs: Dict[str, Any]
    prompt_len: int
    num_generated: int
    selected: Optional[Sequence[int]]
    key_len: int


class Encoded(PackMember, Protocol):
    """An output's encoding as the reward reads it: the ids of ``[q ; o_i]``, whether every generated token carries
    a label, and the system turn's positions (``ddapo.ms_swift.encoding.EncodedCompletion`` is one)."""
    input_ids: List[int]
    labelled: bool
    system_turn: range
    rows: Optional[List[int]]  # a trajectory's rows (positions), None for one turn
    generated: List[int]  # the ids of the rows


@dataclass(frozen=True)
class Member:
    """A `PackMember` by value (tests, the benchmark), of one turn."""
    forward_kwargs: Dict[str, Any] = field(repr=False)
    prompt_len: int
    num_generated: int
    selected: Optional[Sequence[int]] = None

    @property
    def key_len(self) -> int:
        return self.prompt_len


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def shares_prompt(a: Dict[str, Any], b: Dict[str, Any], prompt_len_a: int, prompt_len_b: int) -> bool:
    """Whether two single-sequence forward kwargs hold the same prompt: the same first ``P`` ids (and other
    sequence tensors) and equal non-sequence inputs (pixel values, grids, ...)."""
    if prompt_len_a != prompt_len_b or set(a) != set(b):
        return False
    for key in a:
        if key in DROPPED_KEYS or key == 'attention_mask':
            continue
        if key in SEQUENCE_KEYS:
            if not _same(a[key][..., :prompt_len_a], b[key][..., :prompt_len_b]):
                return False
        elif not _same(a[key], b[key]):
            return False
    return True


def tree_mask(prompt_len: int, num_generated: Sequence[int], device=None) -> torch.Tensor:
    """``[1, 1, L, L]`` boolean mask (``True`` attends) of ``[q ; o_1 ; ... ; o_G]``, ``L = P + sum |o_g|``.

    Prompt rows are causal; a row of ``o_g`` attends to every prompt key and to ``o_g``'s keys up to itself.
    Example: ``P = 2``, ``|o| = [1, 2]``: row 2 (``o_1``) attends to ``{0, 1, 2}``, row 4 (second token of
    ``o_2``) to ``{0, 1, 3, 4}``.
    """
    total = prompt_len + sum(num_generated)
    segment = torch.zeros(total, dtype=torch.long, device=device)  # 0: prompt, g: output g
    start = prompt_len
    for g, n in enumerate(num_generated, start=1):
        segment[start:start + n] = g
        start += n
    position = torch.arange(total, device=device)
    causal = position.unsqueeze(0) <= position.unsqueeze(1)
    same_or_prompt = (segment.unsqueeze(0) == segment.unsqueeze(1)) | (segment.unsqueeze(0) == 0)
    return (causal & same_or_prompt)[None, None]


def pack_shared_prompt(members: Sequence[Dict[str, Any]], prompt_len: int,
                       num_generated: Sequence[int]) -> Tuple[Dict[str, Any], List[range]]:
    """Forward kwargs of ``[q ; o_1 ; ... ; o_G]`` from the single-sequence kwargs (batch size 1) of each output,
    and the rows ``s_{g,t} - 1`` of each ``o_g`` in it.

    ``o_g`` is ``members[g]``'s ``num_generated[g]`` positions after ``prompt_len``; its position ids are
    taken from its own sequence. Members without ``position_ids`` (a family whose collator leaves the plain 1-D
    positions to the model: InternVL, Gemma 3) get them written out, ``0 .. P + |o_g| - 1`` along ``[q ; o_g]``: the
    model would otherwise number the packed sequence ``0 .. L - 1`` and run ``o_g``'s rotary positions on after
    ``o_{g-1}``'s. Raises ValueError when the members do not share the prompt or carry a sequence tensor this
    function does not know how to pack.

    >>> members = [{'input_ids': torch.tensor([[7, 8, 1, 2]])}, {'input_ids': torch.tensor([[7, 8, 3]])}]
    >>> packed, rows = pack_shared_prompt(members, 2, [2, 1])
    >>> packed['input_ids'].tolist(), packed['position_ids'].tolist(), rows
    ([[7, 8, 1, 2, 3]], [[0, 1, 2, 3, 2]], [range(2, 4), range(4, 5)])
    """
    first = members[0]
    for member in members[1:]:
        if not shares_prompt(first, member, prompt_len, prompt_len):
            raise ValueError('pack_shared_prompt: the outputs do not share the prompt')
    length = first['input_ids'].shape[-1]
    unknown = [k for k, v in first.items() if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[-1] == length
               and k not in SEQUENCE_KEYS + DROPPED_KEYS + ('attention_mask',)]
    if unknown:
        raise ValueError(f'pack_shared_prompt: unknown sequence inputs {unknown}')
    if 'position_ids' not in first:
        members = [{**m, 'position_ids': torch.arange(m['input_ids'].shape[-1], device=first['input_ids'].device)
                    .unsqueeze(0)} for m in members]
        first = members[0]
    packed = {k: v for k, v in first.items() if k not in SEQUENCE_KEYS + DROPPED_KEYS + ('attention_mask',)}
    for key in SEQUENCE_KEYS:
        if key in first:
            parts = [first[key][..., :prompt_len]]
            parts += [m[key][..., prompt_len:prompt_len + n] for m, n in zip(members, num_generated)]
            packed[key] = torch.cat(parts, dim=-1)
    packed['attention_mask'] = tree_mask(prompt_len, num_generated, device=first['input_ids'].device)
    rows, start = [], prompt_len
    for n in num_generated:
        rows.append(range(start, start + n))
        start += n
    return packed, rows


def shared_prompt_units(members: Sequence[PackMember], budget: int) -> List[List[int]]:
    """Indices of ``members`` in forwards: outputs sharing a prompt together, in order, while
    ``P + sum |o_g| <= budget`` (a lone output is its own unit whatever its size).

    Example: three outputs of one prompt with ``P = 10``, ``|o| = [5, 5, 5]``, ``budget = 20`` give ``[[0, 1], [2]]``.
    """
    units: List[List[int]] = []
    for index, member in enumerate(members):
        for unit in units:
            head = members[unit[0]]
            size = head.prompt_len + sum(members[i].num_generated for i in unit) + member.num_generated
            if size <= budget and shares_prompt(head.forward_kwargs, member.forward_kwargs, head.prompt_len,
                                                member.prompt_len):
                unit.append(index)
                break
        else:
            units.append([index])
    return units


@dataclass(frozen=True)
class Placement:
    """Where one sample of a collated micro-batch sits: its batch row, the position its sequence starts at in that
    row, and the rows ``s_{i,t} - 1`` of its generated tokens there."""
    batch_index: int
    start: int
    rows: range


LAYOUTS = ('right', 'left', 'packed')


def micro_batch_placements(lengths: Sequence[int], prompt_lens: Sequence[int], num_generated: Sequence[int],
                           layout: str, width: int) -> List[Placement]:
    """The `Placement` of each sample in a micro-batch the trainer collated from the samples' own encodings (lengths
    ``lengths``, prompts ``P``, ``|o_i|`` generated tokens right after the prompt), ``width`` positions wide.

    ``layout`` (`LAYOUTS`): ``right`` (ms-swift's default ``--padding_side right``): sample ``b`` is batch row ``b``
    from position 0; ``left`` (``--padding_side left``): batch row ``b`` from ``width - length``; ``packed``
    (``--padding_free``): one row, the samples one after another, each starting where the previous ended.
    Example: lengths ``[5, 3]``, ``P = [3, 2]``, ``|o| = [2, 1]``:

    >>> def show(layout, width):
    ...     return [(p.batch_index, p.start, p.rows) for p in micro_batch_placements([5, 3], [3, 2], [2, 1], layout,
    ...                                                                               width)]
    >>> show('right', 5)
    [(0, 0, range(3, 5)), (1, 0, range(2, 3))]
    >>> show('left', 5)
    [(0, 0, range(3, 5)), (1, 2, range(4, 5))]
    >>> show('packed', 8)
    [(0, 0, range(3, 5)), (0, 5, range(7, 8))]
    """
    if layout not in LAYOUTS:
        raise ValueError(f'micro-batch layout must be one of {LAYOUTS}, got {layout!r}')
    placements, start = [], 0
    for b, (length, prompt_len, n) in enumerate(zip(lengths, prompt_lens, num_generated)):
        if layout != 'packed':
            start = width - length if layout == 'left' else 0
        placements.append(Placement(0 if layout == 'packed' else b, start,
                                    range(start + prompt_len, start + prompt_len + n)))
        start += length
    return placements


def misplaced(batch_ids: Sequence[Sequence[int]], placement: Placement, ids: Sequence[int]) -> bool:
    """The structural check of a placement, before anything is read there: whether the micro-batch's ids
    ``batch_ids`` at the sample's place differ from the sample's own encoding ``ids`` (the rows, and the keys before
    them, hence ``T`` and ``V`` and their counts). Free: no forward.

    >>> batch = [[0, 0, 5, 6, 7]]  # left-padded
    >>> misplaced(batch, Placement(0, 2, range(4, 5)), [5, 6, 7]), misplaced(batch, Placement(0, 0, range(2, 3)), [5, 6, 7])
    (False, True)
    """
    row = batch_ids[placement.batch_index]
    return list(row[placement.start:placement.start + len(ids)]) != list(ids)


def split_image_grids(grids: Sequence[Sequence[int]], image_tokens: Sequence[int],
                      merge_size: int) -> List[List[List[int]]]:
    """Each sample's rows of a collated micro-batch's ``image_grid_thw`` (the images of all samples, in order), by the
    number of image placeholder tokens each sample holds: image ``(t, h, w)`` has ``t * h * w / merge_size^2`` of
    them. ``[]`` for a sample whose tokens do not match whole images (its report shows no heat map).

    >>> split_image_grids([[1, 4, 4], [1, 2, 4]], [4, 0, 2], merge_size=2)
    [[[1, 4, 4]], [], [[1, 2, 4]]]
    """
    per_sample, row = [], 0
    for tokens in image_tokens:
        mine, seen = [], 0
        while seen < tokens and row < len(grids):
            t, h, w = grids[row]
            mine.append(list(grids[row]))
            seen += t * h * w // merge_size ** 2
            row += 1
        per_sample.append(mine if seen == tokens else [])
    return per_sample
