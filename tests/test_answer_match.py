"""answer_match: the accuracy reward the launcher pairs with ddapo_attention."""
import pytest

from ddapo.answer_match import AnswerMatchORM, answers_match, extract_answer


class TestExtractAnswer:
    """Edge cases: tagged answer (last tag wins), untagged (last line), punctuation and case, empty."""

    def test_tagged(self):
        assert extract_answer('<think>x</think><answer> Red. </answer>') == 'red'
        assert extract_answer('<answer>1</answer> then <answer>2</answer>') == '2'

    def test_untagged_last_line(self):
        assert extract_answer('it is\n3') == '3'

    def test_empty(self):
        assert extract_answer('') == ''


class TestAnswersMatch:
    """Edge cases: clevr-style tagged solution, numbers, mismatch, empty answers never match."""

    @pytest.mark.parametrize('completion, solution, expected', [
        ('<think>count</think><answer>3</answer>', '<answer> 3 </answer>', True),
        ('<answer>3.0</answer>', '3', True),
        ('<answer>circle</answer>', 'square', False),
        ('<answer></answer>', '', False),
    ])
    def test_cases(self, completion, solution, expected):
        assert answers_match(completion, solution) is expected


class TestAnswerMatchORM:
    """Edge cases: a batch with a solution column; rows without a solution give None."""

    def test_batch(self):
        assert AnswerMatchORM()(['<answer>red</answer>', 'blue'], solution=['red', 'red']) == [1.0, 0.0]

    def test_no_solution(self):
        assert AnswerMatchORM()(['<answer>red</answer>']) == [None]
