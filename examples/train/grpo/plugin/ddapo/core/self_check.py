"""The self-check (``DDAPO_SELF_CHECK``, on by default): on the first call that reads a path, a few outputs per rank are
scored again with the plainest reference the product has (``eager``: one sequence per output, the model's own
``eager_attention_forward``, no packing) and the two ``R^bal`` compared. Pure: the comparison, its tolerance, the
path a failed check moves to, and what it says. The forwards are the reward call's (``ddapo.reward_call``).

    path's R^bal, eager R^bal of the same outputs --difference--> max |diff| (inf where only one is defined)
    every rank's (max |diff|, n) --verdict--> agree (within `tolerance` of the model dtype) or move (`next_path`)
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

# |R^bal(path) - R^bal(eager)| allowed, by the precision the policy computes in. float32: the paths agree to about
# 1e-8 on every layout the suite builds, and the errors this check exists for are 1e-3 to 1.5e-1 (a misplaced
# micro-batch row, a pack's rotary positions). Half precision and TF32 matmuls: the path and eager run different
# kernels and batch shapes, whose rounding moves R^bal (2.3e-4 in bf16 on CPU, tests/test_self_check.py; a GPU is not
# measured here);
# 5e-3 still catches a 4e-2 shift on a 0.06 spread.
TOLERANCE = {'float64': 1e-6, 'float32': 1e-4, 'tf32': 5e-3, 'bfloat16': 5e-3, 'float16': 5e-3}
OUTPUTS_PER_RANK = 4  # outputs a rank checks: its first whole group, whatever its size, then others up to this many

# What each path does that eager does not, for the warning of a failed check.
LIKELY_CAUSE = {
    'old_logps': "the trainer's micro-batch (its padding side, packing, or attention implementation) places or "
                 'computes the rows differently from one sequence',
    'own/shared': "the shared-prompt pack [q ; o_1 ; ... ; o_G] (its position ids or tree mask) differs from one "
                  'sequence per output',
    'own/rows': "the eager formula on the sdpa forward's queries and keys differs from the model's eager attention",
}


def tolerance(dtype: str) -> float:
    """The allowed ``|R^bal(path) - R^bal(eager)|`` for a policy computing in ``dtype`` (``torch.float32``,
    ``float32``, ``tf32``, ...).

    >>> tolerance('torch.float32'), tolerance('bfloat16')
    (0.0001, 0.005)
    """
    return TOLERANCE.get(str(dtype).replace('torch.', ''), TOLERANCE['float32'])


# Why eager itself gave no reward for an output: the reference failed, not the path; left out of the comparison.
REFERENCE_FAILURES = frozenset({'out_of_memory', 'encoding_failed', 'reward_forward_failed', 'scoring_failed'})


def difference(path: Sequence[Optional[float]], eager: Sequence[Optional[float]],
               eager_reasons: Sequence[str] = ()) -> Tuple[float, int]:
    """``(max |R^bal(path) - R^bal(eager)|, outputs compared)``: ``inf`` where one side has a value and the other has
    none (a path that loses or invents a reward disagrees), but outputs whose eager result failed for the reference's
    own reasons (`REFERENCE_FAILURES`: out of memory, ...) are left out; ``(0.0, 0)`` for none.

    >>> worst, n = difference([0.25, None, 0.5], [0.2500001, None, 0.5]); worst < 1e-6, n
    (True, 3)
    >>> difference([0.25], [None]), difference([0.25, 0.3], [None, 0.3], ['out_of_memory', '']), difference([], [])
    ((inf, 1), (0.0, 1), (0.0, 0))
    """
    worst, compared = 0.0, 0
    reasons = list(eager_reasons) + [''] * (len(eager) - len(eager_reasons))
    for a, b, reason in zip(path, eager, reasons):
        if b is None and reason in REFERENCE_FAILURES:
            continue
        compared += 1
        if (a is None) != (b is None):
            worst = math.inf
        elif a is not None:
            worst = max(worst, abs(a - b))
    return worst, compared


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


def next_path(path: str, attention: str = 'shared', failed: Sequence[str] = ()) -> str:
    """Where a path that disagreed with eager moves: ``old_logps`` to the reward's own forwards (``own/<attention>``,
    the scheduler's current one), ``own/shared`` to one output per forward (``own/rows``), ``own/rows`` to eager
    itself; never to a path in ``failed`` (one that disagreed already: the next one after it).

    >>> [next_path(p) for p in ('old_logps', 'own/shared', 'own/rows')], next_path('old_logps', 'rows')
    (['own/shared', 'own/rows', 'own/eager'], 'own/rows')
    >>> next_path('old_logps', 'shared', failed=['own/shared'])
    'own/rows'
    """
    moved = f'own/{attention}' if path == 'old_logps' else 'own/rows' if path == 'own/shared' else 'own/eager'
    return next_path(moved, attention, failed) if moved in failed and moved != 'own/eager' else moved
