"""The self-check (``DDAPO_SELF_CHECK``, on by default): on the first call that reads a path, a few outputs per rank are
scored again with the plainest reference the product has (``eager``: one sequence per output, the model's own
``eager_attention_forward``, no packing) and the two ``R^bal`` compared. Pure: the comparison, its tolerance, the
path a failed check moves to, and what it says. The forwards are the reward call's (``ddapo.reward_call``).

    path's R^bal, eager R^bal of the same outputs --difference--> max |diff| (inf where only one is defined)
    every rank's (max |diff|, n) --verdict--> agree (within `tolerance` of the model dtype) or move (`next_path`)
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

# |R^bal(path) - R^bal(eager)| allowed, by the model dtype. float32: the paths agree to about 1e-7 on every layout
# the suite builds, and the errors this check exists for are 1e-3 to 1.5e-1 (a misplaced micro-batch row, a pack's
# rotary positions). Half precision: the path and eager run different kernels and batch shapes, whose rounding moves
# R^bal by about 1e-3 (an estimate, not measured on a GPU here); 5e-3 still catches a 4e-2 shift on a 0.06 spread.
TOLERANCE = {'float64': 1e-6, 'float32': 1e-4, 'bfloat16': 5e-3, 'float16': 5e-3}
OUTPUTS_PER_RANK = 4  # at least one whole group is checked, whatever its size; up to this many outputs beyond it

# What each path does that eager does not, for the warning of a failed check.
LIKELY_CAUSE = {
    'old_logps': "the trainer's micro-batch (its padding side, packing, or attention implementation) places or "
                 'computes the rows differently from one sequence',
    'own/shared': "the shared-prompt pack [q ; o_1 ; ... ; o_G] (its position ids or tree mask) differs from one "
                  'sequence per output',
    'own/rows': "the eager formula on the sdpa forward's queries and keys differs from the model's eager attention",
}


def tolerance(dtype: str) -> float:
    """The allowed ``|R^bal(path) - R^bal(eager)|`` for a model in ``dtype`` (``torch.float32`` or ``float32``).

    >>> tolerance('torch.float32'), tolerance('bfloat16')
    (0.0001, 0.005)
    """
    return TOLERANCE.get(str(dtype).replace('torch.', ''), TOLERANCE['float32'])


def difference(path: Sequence[Optional[float]], eager: Sequence[Optional[float]]) -> float:
    """``max |R^bal(path) - R^bal(eager)|`` over outputs; ``inf`` where one side has a value and the other has none (a
    path that loses or invents a reward disagrees); 0 for no output.

    >>> difference([0.25, None, 0.5], [0.2500001, None, 0.5]) < 1e-6, difference([0.25], [None]), difference([], [])
    (True, inf, 0.0)
    """
    worst = 0.0
    for a, b in zip(path, eager):
        if (a is None) != (b is None):
            return math.inf
        if a is not None:
            worst = max(worst, abs(a - b))
    return worst


def check_sample(prompt_ids: Sequence[object], limit: int = OUTPUTS_PER_RANK) -> List[int]:
    """Indices of the outputs a rank checks: the first prompt's whole group, then further outputs in order up to
    ``limit`` in all.

    >>> check_sample(['a', 'b', 'a', 'a', 'c', 'b'], limit=4)
    [0, 2, 3, 1]
    >>> check_sample(['a'] * 6, limit=4)
    [0, 1, 2, 3, 4, 5]
    """
    if not prompt_ids:
        return []
    group = [i for i, p in enumerate(prompt_ids) if p == prompt_ids[0]]
    rest = [i for i in range(len(prompt_ids)) if i not in group]
    return group + rest[:max(0, limit - len(group))]


@dataclass(frozen=True)
class Verdict:
    """A path's self-check over every rank: the largest difference, the outputs compared, the tolerance."""
    path: str
    max_abs_diff: float
    outputs: int
    tolerance: float

    @property
    def agrees(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def message(self, moved_to: Optional[str] = None) -> str:
        """The start log's line: ``[DDAPO] self-check: <path> agrees with eager (max |diff| = ...)``, or the warning of
        a disagreement, naming the difference, the likely cause and the path moved to."""
        if self.agrees:
            return (f'[DDAPO] self-check: {self.path} agrees with eager (max |diff| = {self.max_abs_diff:.2e} over '
                    f'{self.outputs} outputs; tolerance {self.tolerance:.0e})')
        return (f'[DDAPO] self-check: {self.path} disagrees with eager (max |diff| = {self.max_abs_diff:.3g} over '
                f'{self.outputs} outputs; tolerance {self.tolerance:.0e}); likely cause: '
                f'{LIKELY_CAUSE.get(self.path, "unknown")}. This step\'s rewards are the eager ones, and every rank '
                f'moves to {moved_to} (checked in turn on its first call). Please report it with the [DDAPO_DEBUG] '
                'lines: a layout the reward does not read exactly.')


def next_path(path: str, attention: str = 'shared') -> str:
    """Where a path that disagreed with eager moves: ``old_logps`` to the reward's own forwards (``own/<attention>``,
    ``DDAPO_ATTENTION``), ``own/shared`` to one output per forward (``own/rows``), ``own/rows`` to eager itself.

    >>> [next_path(p) for p in ('old_logps', 'own/shared', 'own/rows')], next_path('old_logps', 'rows')
    (['own/shared', 'own/rows', 'own/eager'], 'own/rows')
    """
    if path == 'old_logps':
        return f'own/{attention}'
    return 'own/rows' if path == 'own/shared' else 'own/eager'
