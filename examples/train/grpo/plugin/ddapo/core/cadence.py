"""Step rules for reward calls that do not come every step: "every N-th logged step" (validation steps, the report)
when GRPO generates only every k steps (``--steps_per_generation``, ``--num_iterations`` > 1, a generation batch
larger than the global batch).

The rewards of a generation are computed at one ``global_step`` ``s`` (logged as step ``s + 1``) and train the steps
until the next generation. A rule that tests ``(s + 1) % N == 0`` only sees the steps calls land on, so with calls every
k steps it can miss forever (k = 2, N = 2: calls at s = 0, 2, 4, ... never validate). A `Cadence` instead asks whether
a step ``n`` with ``n % N == 0`` was reached since the previous call: ``(p + 1, s + 1]``, ``p`` the previous call's
step. With a call every step that is ``(s + 1) % N == 0``, today's rule. Pure: no trainer.
"""
from typing import Optional


class Cadence:
    """Which calls are due under "every ``every``-th step" (``every`` 0: none; ``first``: global step 0 is due too,
    the step ms-swift logs first), for calls at any steps. One answer per step: a step's later calls (gradient accumulation, the old log-prob
    capture before the reward call) get the step's first answer, so every reader of a step agrees. Every rank calls
    at the same steps, so every rank agrees too.

    Calls every step, ``every = 3``: due at logged steps 3 and 6, as ``(s + 1) % 3 == 0``:

    >>> cadence = Cadence(3)
    >>> [s + 1 for s in range(8) if cadence.due(s)]
    [3, 6]

    Calls every second step (``--steps_per_generation 2``), ``every = 2``: the call at ``s = 2`` trains steps 3 and
    4, and step 2 was reached since the call at ``s = 0``; the old rule never fires:

    >>> cadence = Cadence(2)
    >>> [s for s in (0, 2, 4, 6) if cadence.due(s)], [s for s in (0, 2, 4, 6) if (s + 1) % 2 == 0]
    ([2, 4, 6], [])

    Step 0 (the report's first step), a step asked twice, and a run resumed at step 5 (its first call is not step 0):

    >>> cadence = Cadence(4, first=True)
    >>> [cadence.due(s) for s in (0, 0, 2, 2, 4)]
    [True, True, False, False, True]
    >>> cadence = Cadence(4, first=True)
    >>> [cadence.due(s) for s in (5, 7)]
    [False, True]
    """

    def __init__(self, every: int, first: bool = False):
        if every < 0:
            raise ValueError(f'every must be >= 0, got {every}')
        self.every, self.first = every, first
        self._step: Optional[int] = None  # the step of the last call, and its answer
        self._due = False

    def due(self, step: int) -> bool:
        """Whether the call at ``global_step`` ``step`` is due; the same answer for every call at that step."""
        if step == self._step:
            return self._due
        previous, self._step = self._step, step
        if previous is None:  # the run's (or a resumed run's) first call: only its own step counts
            reached = self.every > 0 and (step + 1) % self.every == 0
        else:
            reached = self.every > 0 and (step + 1) // self.every > (previous + 1) // self.every
        self._due = reached or (self.first and step == 0)
        return self._due
