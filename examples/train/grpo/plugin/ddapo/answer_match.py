"""``answer_match``: 1.0 when the completion's answer equals the dataset's ``solution``, else 0.0.

ms-swift's built-in ``accuracy`` verifies LaTeX math; image question sets such as
``AI-ModelScope/clevr_cogen_a_train`` (solution ``<answer> 3 </answer>``) and the demo's shapes
(solution ``red``) need a plain answer match. The answer is the last ``<answer>...</answer>`` of the
completion, or its last line when it has no such tag.
"""
import re
from typing import List, Optional

from swift.rewards import ORM

_ANSWER = re.compile(r'<answer>(.*?)</answer>', re.DOTALL)


def extract_answer(text: str) -> str:
    """Example: ``'<think>...</think><answer> Red. </answer>'`` gives ``'red'``; ``'it is\\n3'`` gives ``'3'``."""
    tagged = _ANSWER.findall(text)
    answer = tagged[-1] if tagged else (text.strip().splitlines() or [''])[-1]
    return ' '.join(answer.split()).strip(' .,;:!?"\'').lower()


def answers_match(completion: str, solution: str) -> bool:
    """Equal after `extract_answer`, or equal as numbers (``'3.0'`` matches ``'3'``)."""
    answer, expected = extract_answer(completion), extract_answer(solution)
    if answer == expected:
        return bool(answer)
    try:
        return float(answer) == float(expected)
    except ValueError:
        return False


class AnswerMatchORM(ORM):
    """Accuracy reward for image question sets with a ``solution`` column; ``None`` where a row has none."""

    def __call__(self, completions: List[str], solution: Optional[List[str]] = None, **kwargs) -> List[Optional[float]]:
        solutions = solution or [None] * len(completions)
        return [None if s is None else float(answers_match(c, str(s))) for c, s in zip(completions, solutions)]
