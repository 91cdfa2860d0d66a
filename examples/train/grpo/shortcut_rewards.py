"""The shortcut study's two diagnostic rewards (examples/train/grpo/shortcut_study.py), one more ``--external_plugins``
file after plugin.py: ``answer_match`` on the held-out rows of one half each (the dataset's ``prior`` column: ``in``,
the question's note names the right colour; ``counter``, it names a wrong one), ``None`` on every other row. Weighted
0, they are logged apart (``rewards/InPriorAccuracy/mean``, ``eval_rewards/CounterPriorAccuracy/mean``, ...) and never
optimised."""
from typing import List, Optional

from swift.rewards import ORM, orms

from ddapo.answer_match import answers_match


class PriorAccuracy(ORM):
    """1.0 / 0.0 as ``answer_match`` on the rows whose ``prior`` is `PRIOR`, None elsewhere."""
    PRIOR = ''

    def __call__(self, completions: List[str], solution: Optional[List[str]] = None, prior: Optional[List] = None,
                 **kwargs) -> List[Optional[float]]:
        solutions, priors = solution or [None] * len(completions), prior or [None] * len(completions)
        return [float(answers_match(c, str(s))) if p == self.PRIOR and s is not None else None
                for c, s, p in zip(completions, solutions, priors)]


class InPriorAccuracy(PriorAccuracy):
    PRIOR = 'in'


class CounterPriorAccuracy(PriorAccuracy):
    PRIOR = 'counter'


orms['in_prior_accuracy'] = InPriorAccuracy
orms['counter_prior_accuracy'] = CounterPriorAccuracy
