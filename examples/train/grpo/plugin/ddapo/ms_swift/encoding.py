"""Rows and their encoding: the per-output rows ms-swift batched into the reward kwargs, and ``[q ; o_i]`` encoded
with the trainer's template (exact generated ids, the prompt length ``P``, the system turn's positions)."""
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from swift.rl_core.data import GRPOSample
from swift.rlhf_trainers.utils import encode_sample

from ddapo.core.key_sets import KeySets, build_key_sets, inserted_span
from ddapo.core.row import Row
from ddapo.ms_swift.compat import CHECKED_AGAINST, SUPPORTED_MODEL_TYPES

TEMPLATE_MODE = 'train'  # the mode ms-swift's GRPO encodes and forwards in (swift/pipelines/train/rlhf.py)
# Reward kwargs that are not columns of rows: ms-swift's trainer_state (and trajectory_inputs, a dict, in server
# multi-turn), the patch's trainer.
NOT_ROW_KWARGS = frozenset({'trainer', 'trainer_state', 'trajectory_inputs'})


def reward_rows(kwargs: Dict[str, Any], num_completions: int) -> List[Row]:
    """The rows ms-swift batched into the reward kwargs (``RowPreprocessor.rows_to_batched`` of every sample's
    ``to_reward_row()``), back as rows: every kwarg but `NOT_ROW_KWARGS` is a column with one value per output.
    Raises RuntimeError when one is not (an ms-swift that batches its kwargs differently).

    >>> rows = reward_rows({'trainer_state': None, 'prompt_id': ['a', 'b'], 'images': [None, ['x.png']]}, 2)
    >>> [(row.prompt_id, row.images) for row in rows]
    [('a', []), ('b', ['x.png'])]
    """
    from swift.dataset import RowPreprocessor
    columns = {k: v for k, v in kwargs.items() if k not in NOT_ROW_KWARGS}
    odd = sorted(k for k, v in columns.items() if not isinstance(v, (list, tuple)) or len(v) != num_completions)
    if odd:
        raise RuntimeError(f'ddapo_attention reads one row per completion from the reward kwargs, and {odd} are not '
                           f'columns of {num_completions} values: this ms-swift batches reward kwargs differently '
                           f'from the one it was checked against ({CHECKED_AGAINST["ms-swift"]}).')
    return [Row(row) for row in (RowPreprocessor.batched_to_rows(columns) if columns else
                                 [{} for _ in range(num_completions)])]


def generated_turns(response_token_ids: Sequence) -> List[List[int]]:
    """The ids of every generated turn (ms-swift stores a list per turn, or one flat list for one turn).

    >>> generated_turns([[5, 6], [7]]), generated_turns([5, 6]), generated_turns(None)
    ([[5, 6], [7]], [[5, 6]], [])
    """
    if response_token_ids and isinstance(response_token_ids[0], (list, tuple)):
        return [[int(t) for t in turn] for turn in response_token_ids]
    return [[int(t) for t in response_token_ids]] if response_token_ids else []


def generated_ids(response_token_ids: Sequence) -> List[int]:
    """The ids of the final generated turn."""
    turns = generated_turns(response_token_ids)
    return turns[-1] if turns else []


def is_trajectory(response_token_ids: Sequence, response_loss_mask: Sequence = ()) -> bool:
    """Whether the row is read as a trajectory (notation section 6): several generated turns, or a turn with tokens its
    loss mask leaves out (a scheduler's masked response prefix or environment text), which only the trajectory
    encoding places exactly.

    >>> is_trajectory([[5, 6], [7]]), is_trajectory([[5, 6]], [[1, 1]]), is_trajectory([[5, 6]], [[0, 1]])
    (True, False, True)
    """
    return len(generated_turns(response_token_ids)) > 1 or any(0 in list(mask) for mask in response_loss_mask or [])


@dataclass
class EncodedCompletion:
    """``x_i = [q ; o_i]`` as the template encodes it, and where ``o_i`` sits in it."""
    input_ids: List[int]
    prompt_len: int  # P
    num_generated: int  # |o_i|
    forward_kwargs: Dict[str, Any] = field(repr=False)
    labelled: bool = True  # every generated token carries a label, so it is a completion token of the GRPO loss
    system_turn: range = range(0)  # positions of the system turn (SystemTurns), empty without one
    # A multi-turn trajectory (notation section 6): its rows, the positions the loss trains (P is the first), and the
    # model's own tokens before the last row (in neither key set); `num_generated` is then the span from the first row
    # to the last, which a forward captures. None / empty for one turn.
    rows: Optional[List[int]] = None
    own: Tuple[int, ...] = ()
    turns: Tuple[range, ...] = ()  # each generated turn's ids, for the report

    @property
    def selected(self) -> Optional[List[int]]:
        """A trajectory's rows as offsets from ``P``, None for one turn."""
        return None if self.rows is None else [r - self.prompt_len for r in self.rows]

    @property
    def key_len(self) -> int:
        """The keys are the positions before this one: ``P``, or a trajectory's last row."""
        return self.rows[-1] if self.rows else self.prompt_len

    def key_sets(self, vision_token_ids, special_ids) -> KeySets:
        """``T`` and ``V`` of this encoding (notation sections 2 and 6)."""
        return build_key_sets(self.input_ids, self.key_len, vision_token_ids, special_ids, self.system_turn, self.own,
                              None if self.rows is None else self.prompt_len)

    @property
    def generated(self) -> List[int]:
        """The ids of the rows: ``o_i``, or a trajectory's trained tokens."""
        if self.rows is not None:
            return [self.input_ids[r] for r in self.rows]
        return list(self.input_ids[self.prompt_len:self.prompt_len + self.num_generated])


class NotEncodable(ValueError):
    """A row whose encoding the reward cannot use; ``reason`` (each subclass's) is its not-applicable reason."""
    reason: str


class EncodingFailed(NotEncodable):
    """The template could not encode the row at all (an image file that cannot be read, ...)."""
    reason = 'encoding_failed'


class GeneratedIdsMismatch(NotEncodable):
    """The template's encoding does not hold the generated ids right after the prompt."""
    reason = 'generated_ids_mismatch'


class SystemTurnNotFound(NotEncodable):
    """The template's encoding of a row does not hold its system turn where the template renders it."""
    reason = 'system_turn_not_found'


PROBE_TEXT = 'DDAPO probe'


@contextmanager
def _without_system(template, drop: bool = True) -> Iterator[None]:
    """The template renders no system turn inside the block (``drop``): an instance attribute shadows its
    ``_get_system`` for this rendering only, and is removed on exit."""
    if not drop:
        yield
        return
    template._get_system = lambda inputs: None
    try:
        yield
    finally:
        del template._get_system


class SystemTurns:
    """Where the trainer's template renders the system turn, found the way the template builds it.

    ms-swift's template renders the system message (the row's, or the default system it inserts, with tools and
    model-specific instructions folded in) from ``Template._get_system``; with ``None`` there it renders no system
    turn. Two renderings of a probe conversation, as is and with ``_get_system`` returning ``None``, differ by
    exactly the system turn (`inserted_span`), whatever the chat format. The block is cached per distinct system
    setting and checked token for token in every row's encoding: a row where it is not found gives None
    (``system_turn_not_found``), never a system turn counted as text. `check` refuses, at start, a chat format
    whose system turn cannot be located this way.
    """

    def __init__(self, template):
        self.template = template
        self._blocks: Dict[str, Tuple[int, Tuple[int, ...]]] = {}

    def _render(self, system: Optional[str], extra: Dict[str, Any], drop_system: bool) -> List[int]:
        # Without the system turn, the system message is left out too: a template without a system role (Gemma 3)
        # folds it into the first user turn itself, not through `_get_system`.
        messages = [{'role': 'system', 'content': system}] if system is not None and not drop_system else []
        messages += [{'role': 'user', 'content': PROBE_TEXT}, {'role': 'assistant', 'content': PROBE_TEXT}]
        with _without_system(self.template, drop_system):
            return list(self.template.encode({'messages': messages, **extra})['input_ids'])

    def block(self, system: Optional[str], extra: Optional[Dict[str, Any]] = None) -> Tuple[int, Tuple[int, ...]]:
        """``(offset, ids)`` of the system turn the template renders for ``system`` (``None``: the template's
        default) and the row settings ``extra`` (``tools``, ``chat_template_kwargs``); ``ids`` is empty without one.
        Raises `SystemTurnNotFound` when the two renderings do not differ by one block."""
        extra = {k: v for k, v in (extra or {}).items() if v}
        key = json.dumps([system, extra], sort_keys=True, default=str)
        if key not in self._blocks:
            with_system, without = self._render(system, extra, False), self._render(system, extra, True)
            decode = self.template.tokenizer.decode
            blank = {t for t in set(with_system) if not decode([t]).strip()}
            span = inserted_span(with_system, without, blank)
            if span is None:
                raise SystemTurnNotFound(
                    f'the template {self.template.template_meta.template_type!r} renders the system message '
                    'somewhere other than one block of the conversation, so its positions cannot be told from the '
                    'text keys T')
            self._blocks[key] = (span.start, tuple(with_system[span.start:span.stop]))
        return self._blocks[key]

    def span(self, row: Row, input_ids: Sequence[int]) -> range:
        """The system turn's positions in ``input_ids``, the template's encoding of ``row``."""
        messages = row.messages
        system = messages[0].get('content') if messages and messages[0].get('role') == 'system' else None
        offset, ids = self.block(system, {'tools': row.columns.get('tools'),
                                          'chat_template_kwargs': row.columns.get('chat_template_kwargs')})
        if not ids:
            return range(0)
        if tuple(input_ids[offset:offset + len(ids)]) != ids:
            raise SystemTurnNotFound(f'the encoding does not hold the {len(ids)}-token system turn the template '
                                     f'renders at position {offset}')
        return range(offset, offset + len(ids))

    def check(self) -> None:
        """At start: the system turn of an explicit system message, and of the template's default, can be located,
        and the explicit one holds the system text. Raises ValueError naming the fix."""
        meta = self.template.template_meta
        probe = f'{PROBE_TEXT} system message.'
        try:
            with template_state(self.template):
                self.block(None)  # the template's default system (or none)
                if not getattr(meta, 'support_system', True):
                    return
                offset, ids = self.block(probe)
        except SystemTurnNotFound as error:
            raise ValueError(f'ddapo_attention cannot locate the system turn: {error}. The text keys T must leave '
                             'the system turn out (docs/notation.md); use a model family whose template renders '
                             f'it as one block ({", ".join(SUPPORTED_MODEL_TYPES)}).') from None
        if probe not in self.template.tokenizer.decode(list(ids)):
            raise ValueError(f'ddapo_attention cannot locate the system turn of template {meta.template_type!r}: '
                             'rendering it without the system message does not remove the system text (a jinja '
                             'chat template, --template_backend jinja?). The text keys T must leave the system '
                             "turn out (docs/notation.md); use ms-swift's own template backend (the default).")


def encode_completion(trainer, row: Row, system_turns: Optional[SystemTurns] = None) -> EncodedCompletion:
    """Encode the prompt with the trainer's template followed by exactly ``response_token_ids``.

    ms-swift's own `encode_sample` does what the training forward does (response ids injected, never
    re-tokenised text); the template then appends its end of turn (``<|im_end|>\\n`` in ChatML), so ``o_i`` is the
    ``|o_i|`` positions right after the prompt, the first labelled position. A thinking template's response prefix
    (``<think>`` and a newline, or an empty think block with thinking off) was prompt context during rollout:
    `encode_sample` puts it before the generated ids without a label, so it is part of ``q``. An empty
    completion encodes the prompt with an empty answer (``|o_i| = 0``). The batch stays on the CPU until its
    forward. ``system_turns`` locates the system turn (raises `SystemTurnNotFound`).

    A multi-turn trajectory is encoded whole, every turn's ids and loss mask (``response_loss_mask``) in its assistant
    message, exactly as GRPO's loss encodes it (`locate_trajectory`).
    """
    template = trainer.template
    sample = GRPOSample.from_row(dict(row.columns))
    trajectory = is_trajectory(sample.response_token_ids, sample.response_loss_mask)
    if not trajectory:
        ids = generated_ids(sample.response_token_ids)
        sample.response_token_ids = [ids] if ids else []  # the last turn alone, as it was generated
        sample.response_loss_mask = []
        if not ids and sample.messages and sample.messages[-1].get('role') == 'assistant':
            sample.messages[-1] = {**sample.messages[-1], 'content': ''}
    encoded = encode_sample(sample, template)
    encoded.pop('_extra_kwargs', None)
    if trajectory:  # raises before the collator's work
        completion = locate_trajectory(encoded, sample.response_token_ids, sample.response_loss_mask, row,
                                       system_turns)
    else:
        completion = locate_completion(encoded, ids, row, system_turns)
    batch = template.data_collator([encoded])
    batch.pop('labels', None)
    batch['logits_to_keep'] = 1  # the reward reads attention only; skip the full-vocabulary head
    completion.forward_kwargs = batch
    return completion


def locate_completion(encoded: Dict[str, Any], ids: Sequence[int], row: Row,
                      system_turns: Optional[SystemTurns]) -> EncodedCompletion:
    """Where ``o_i`` sits in an ``encode_sample`` encoding (the reward's own, or the trainer's for the old log-prob
    forward): ``P`` is the first labelled position, the generated ids must follow it exactly (`GeneratedIdsMismatch`),
    and the system turn is located (`SystemTurnNotFound`). ``forward_kwargs`` is the encoding itself."""
    input_ids = [int(t) for t in encoded['input_ids']]
    labels = [int(t) for t in encoded['labels']]
    ids = [int(t) for t in ids]
    prompt_len = next((i for i, label in enumerate(labels) if label != -100), len(labels))
    if input_ids[prompt_len:prompt_len + len(ids)] != ids:
        raise GeneratedIdsMismatch(f'encoded sequence does not hold the {len(ids)} generated ids at position '
                                   f'{prompt_len} (sequence length {len(input_ids)})')
    labelled = all(label != -100 for label in labels[prompt_len:prompt_len + len(ids)])
    system_turn = system_turns.span(row, input_ids[:prompt_len]) if system_turns is not None else range(0)
    return EncodedCompletion(input_ids, prompt_len, len(ids), encoded, labelled, system_turn)


def _labelled_runs(labels: Sequence[int]) -> List[range]:
    """The maximal runs of labelled positions (label not -100), in order.

    >>> _labelled_runs([-100, 5, 6, -100, -100, 7, -100, 8])
    [range(1, 3), range(5, 6), range(7, 8)]
    """
    runs, start = [], None
    for position, label in enumerate(list(labels) + [-100]):  # the sentinel closes a run at the end
        if label != -100 and start is None:
            start = position
        elif label == -100 and start is not None:
            runs.append(range(start, position))
            start = None
    return runs


def _mask_runs(mask: Sequence[int]) -> int:
    """How many maximal runs of 1 a loss mask has: the runs of labels its turn leaves in the encoding.

    >>> _mask_runs([0, 1, 1, 0, 1]), _mask_runs([0, 0])
    (2, 0)
    """
    return sum(1 for j, m in enumerate(mask) if m and (j == 0 or not mask[j - 1]))


def _only_occurrence(sequence: List[int], part: List[int], start: int, stop: int) -> int:
    """The one position in ``[start, stop)`` where ``part`` occurs whole, or -1 where it occurs nowhere or more than
    once.

    >>> _only_occurrence([3, 4, 3, 4, 5], [3, 4], 1, 5), _only_occurrence([3, 4, 3, 4], [3, 4], 0, 4)
    (2, -1)
    """
    found = [p for p in range(start, stop - len(part) + 1) if sequence[p:p + len(part)] == part]
    return found[0] if len(found) == 1 else -1


def _fits(input_ids: List[int], labels: List[int], start: int, ids: List[int], mask: List[int]) -> bool:
    """Whether the turn's ids sit at ``start`` with the labels `encode_sample` gives them: the id where the loss mask
    is 1, -100 where it is 0."""
    stop = start + len(ids)
    return (0 <= start and stop <= len(input_ids) and input_ids[start:stop] == ids
            and labels[start:stop] == [t if m else -100 for t, m in zip(ids, mask)])


def locate_trajectory(encoded: Dict[str, Any], response_token_ids: Sequence, loss_mask: Sequence, row: Row,
                      system_turns: Optional[SystemTurns]) -> EncodedCompletion:
    """A multi-turn trajectory in an ``encode_sample`` encoding (notation section 6), located from its labels.

    ``encode_sample`` puts the turns in the last assistant messages, labels each turn's ids whose loss mask is 1 (the
    id itself) and puts -100 on its mask-0 ids and on all non-assistant text; the end of turn the template appends
    after a turn whose last id has mask 1 is labelled too, and lengthens that turn's last run of labels. So the turns'
    labels are the encoding's last runs of labelled positions, one per run of 1 in their masks (earlier runs are
    assistant text of the prompt), and each turn starts as many positions before its first run as its mask has 0s
    before its first 1. A turn whose mask is all 0 carries no label: it is the only place its ids occur between its
    neighbours. Text anywhere else that holds a turn's ids is never taken for it. `GeneratedIdsMismatch` where the
    ids and labels there are not the turn's.

    The rows are the labelled positions up to the end of the last turn's ids (what GRPO's completion mask trains:
    every turn's trained tokens, and the end of turn the template appends to the turns before the last, not the tail
    after it); ``P`` is the first row. The model's own tokens are the rows and the turns' ids whose loss mask is 1;
    ids masked out (environment text a scheduler wrote into a turn) are keys.

    >>> encoded = {'input_ids': [1, 9, 5, 6, 2, 9, 3, 7, 8], 'labels': [-100, -100, 5, 6, 2, -100, -100, 7, 8]}
    >>> traj = locate_trajectory(encoded, [[5, 6], [7, 8]], [], None, None)
    >>> traj.rows, traj.prompt_len, traj.num_generated, traj.own, traj.turns
    ([2, 3, 4, 7, 8], 2, 7, (2, 3, 4, 7), (range(2, 4), range(7, 9)))

    The user turn quotes the first turn's ids ``[5, 6]`` before the model wrote them; they stay keys:

    >>> encoded = {'input_ids': [1, 5, 6, 9, 5, 6, 2, 9, 3, 7, 8],
    ...            'labels': [-100, -100, -100, -100, 5, 6, 2, -100, -100, 7, 8]}
    >>> traj = locate_trajectory(encoded, [[5, 6], [7, 8]], [], None, None)
    >>> traj.rows, traj.prompt_len, traj.num_generated, traj.own, traj.turns
    ([4, 5, 6, 9, 10], 4, 7, (4, 5, 6, 9), (range(4, 6), range(9, 11)))
    """
    input_ids = [int(t) for t in encoded['input_ids']]
    labels = [int(t) for t in encoded['labels']]
    masks = [list(m) for m in loss_mask or []]
    turns_ids = generated_turns(response_token_ids)
    # (turn number, ids, mask) of the non-empty turns; a mask that does not fit its ids counts every id as trained
    turns_in = [(k, ids, masks[k] if k < len(masks) and len(masks[k]) == len(ids) else [1] * len(ids))
                for k, ids in enumerate(turns_ids) if ids]
    runs = _labelled_runs(labels)
    needed = sum(_mask_runs(mask) for _, _, mask in turns_in)
    if needed > len(runs):
        raise GeneratedIdsMismatch(f'the encoding has {len(runs)} runs of labels, and the {len(turns_in)} generated '
                                   f'turns need {needed}')
    run = len(runs) - needed  # the first run of the turns' labels
    floor = runs[run - 1].stop if run else 0  # a turn starts after everything before it
    turns, own = [], set()
    for i, (k, ids, mask) in enumerate(turns_in):
        if 1 in mask:
            start = runs[run].start - mask.index(1)
            run += _mask_runs(mask)
        else:
            later = next((m for _, _, m in turns_in[i + 1:] if 1 in m), None)
            stop = len(input_ids) if later is None else runs[run].start - later.index(1)
            start = _only_occurrence(input_ids, ids, floor, stop)
        if start < floor or not _fits(input_ids, labels, start, ids, mask):
            raise GeneratedIdsMismatch(f'the encoding does not hold generated turn {k + 1} ({len(ids)} ids) with its '
                                       f'labels where they place it (position {start}, sequence length '
                                       f'{len(input_ids)})')
        turns.append(range(start, start + len(ids)))
        own.update(start + j for j, m in enumerate(mask) if m)
        floor = max(start + len(ids), runs[run - 1].stop if run else 0)  # past the end of turn labelled after it
    cursor = turns[-1].stop if turns else 0
    rows = [p for p in range(cursor) if labels[p] != -100]
    if not rows:
        raise GeneratedIdsMismatch('no generated token of the trajectory carries a label')
    own.update(rows)
    prompt_len = rows[0]
    system_turn = system_turns.span(row, input_ids[:prompt_len]) if system_turns is not None else range(0)
    return EncodedCompletion(input_ids, prompt_len, rows[-1] - prompt_len + 1, encoded, True, system_turn, rows=rows,
                             own=tuple(sorted(p for p in own if p < rows[-1])), turns=tuple(turns))


def padding_row(trainer) -> Row:
    """A minimal row whose forward keeps a rank in step with the others (ZeRO-3 gathers in every forward;
    ms-swift runs the vision tower on a dummy image for text-only rows, so the same modules run)."""
    eos = trainer.template.tokenizer.eos_token_id  # any family's: <|im_end|>, GLM's <|endoftext|>, Gemma's <eos>
    return Row({'messages': [{'role': 'user', 'content': '.'}, {'role': 'assistant', 'content': ''}],
                'response_token_ids': [[eos]]})


@contextmanager
def template_state(template) -> Iterator[None]:
    saved = (template.mode, template.max_length, template.padding_free)
    template.set_mode(TEMPLATE_MODE)
    template.max_length = None  # as the trainer's own encoding for the policy forward
    template.padding_free = False  # one sequence, batch size 1: nothing to pack
    try:
        yield
    finally:
        template.set_mode(saved[0])
        template.max_length, template.padding_free = saved[1:]
