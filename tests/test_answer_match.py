"""answer_match: the accuracy reward the launcher pairs with ddapo_attention."""
import pytest

from ddapo.answer_match import (AnswerMatchORM, answer_spans, answers_match, completion_letter, extract_answer,
                                named_letters, parse_options, plain_match, row_options, solution_letter)

OPTIONS = {'A': 'cat', 'B': 'dog', 'C': 'Vitamin C'}


class TestExtractAnswer:
    """Edge cases: tagged answer (last tag wins), untagged (last line), punctuation and case, empty."""

    def test_tagged(self):
        assert extract_answer('<think>x</think><answer> Red. </answer>') == 'red'
        assert extract_answer('<answer>1</answer> then <answer>2</answer>') == '2'

    def test_untagged_last_line(self):
        assert extract_answer('it is\n3') == '3'

    def test_empty(self):
        assert extract_answer('') == ''


class TestPlainMatch:
    """Edge cases: equal after normalization, equal as numbers, a word against a number, empty never matches."""

    @pytest.mark.parametrize('completion, solution, expected', [
        ('<answer> Red. </answer>', 'red', True),
        ('<answer>3.0</answer>', '<answer> 3 </answer>', True),
        ('<answer>three</answer>', '3', False),
        ('<answer></answer>', '', False),
    ])
    def test_cases(self, completion, solution, expected):
        assert plain_match(completion, solution) is expected


class TestParseOptions:
    """Edge cases: list in letter order, tuple, dict with lower-case and non-letter keys, MMMU's literal string,
    own-letter prefixes stripped (another letter's prefix kept), letters past J dropped, None values dropped,
    unreadable strings and other types give {}."""

    def test_list_and_tuple(self):
        assert parse_options(['cat', 'dog']) == parse_options(('cat', 'dog')) == {'A': 'cat', 'B': 'dog'}

    def test_dict(self):
        assert parse_options({'a': 'cat', ' B ': 'dog', 'AB': 'x', 1: 'y'}) == {'A': 'cat', 'B': 'dog'}

    def test_literal_string(self):
        assert parse_options("['cat', 'dog']") == {'A': 'cat', 'B': 'dog'}
        assert parse_options("{'A': 'cat'}") == {'A': 'cat'}

    def test_own_prefix(self):
        assert parse_options(['(A) cat', 'B. dog', 'C: cow', 'A) pig']) == \
            {'A': 'cat', 'B': 'dog', 'C': 'cow', 'D': 'A) pig'}

    def test_past_j_and_none(self):
        assert list(parse_options([str(i) for i in range(12)])) == list('ABCDEFGHIJ')
        assert parse_options(['cat', None, 'cow']) == {'A': 'cat', 'C': 'cow'}

    @pytest.mark.parametrize('value', [None, '', 'cat, dog', "'cat'", 3, {'A'}])
    def test_unreadable(self, value):
        assert parse_options(value) == {}


class TestSolutionLetter:
    """Edge cases: the four written forms and the tag; lower case, two letters, K, words and numbers are no letter;
    with options, an option's text (any case) names it, a text of no option or of two options does not."""

    @pytest.mark.parametrize('solution', ['B', '(B)', 'B.', 'B)', 'B:', '<answer>B</answer>', '<answer> (B) </answer>'])
    def test_letter_forms(self, solution):
        assert solution_letter(solution) == 'B'

    @pytest.mark.parametrize('solution', ['b', 'AB', 'K', 'red', '3', '<answer> 3 </answer>', 'B dog', ''])
    def test_no_letter(self, solution):
        assert solution_letter(solution) is None

    def test_option_text(self):
        assert solution_letter('DOG', OPTIONS) == 'B'
        assert solution_letter('cow', OPTIONS) is None
        assert solution_letter('cat', {'A': 'cat', 'B': 'Cat'}) is None


class TestAnswerSpans:
    """Edge cases: tag content, markdown bold, "Answer:" and "answer is" cues (the last wins, its text ends at
    its line, a cue followed by a newline reads the next line), untagged last line, no cue."""

    def test_tag_and_bold(self):
        assert answer_spans('<answer>1</answer><answer> **B** </answer>') == ['B']

    def test_cues(self):
        assert answer_spans('Answer: A\nthe answer is (B).\nbecause') == ['(B)', 'because']
        assert answer_spans('<answer>Final answer:\n C\n</answer>') == ['C', 'Final answer: C']

    def test_no_cue(self):
        assert answer_spans('the dog\n"So B."') == ['So B']  # outer quotes and closing punctuation go
        assert answer_spans('') == ['']


class TestNamedLetters:
    """Edge cases: lead forms; lead with its own option text holding another letter (B. Vitamin C) and with
    another option's text (conflict); marked second letter after a lead; option text alone; two letters (or,
    comma, slash, and); the article "A dog" and the pronoun "I think" against "A is", "A because", "I"; letters
    inside words, hyphenations, abbreviations and calls; K and lower case are no letters."""

    @pytest.mark.parametrize('answer', ['B', '(B)', 'B.', 'B. dog', 'B) dog', 'B: dog', '(B) dog'])
    def test_lead(self, answer):
        assert named_letters(answer) == {'B'}

    def test_lead_with_option_text(self):
        assert named_letters('C. Vitamin C', OPTIONS) == {'C'}
        assert named_letters('B. Plan C: cheap') == {'B', 'C'}  # without options, a marked C is a second letter
        assert named_letters('B. cat', OPTIONS) == {'A', 'B'}

    def test_option_text(self):
        assert named_letters('Dog', OPTIONS) == {'B'}
        assert named_letters('dog', None) == frozenset()
        assert named_letters('a dog', OPTIONS) == frozenset()  # equality, not containment

    @pytest.mark.parametrize('answer', ['A or B', '(A) (C)', 'A, B', 'A/B', 'A and C', 'A. cat or B. dog'])
    def test_two_letters(self, answer):
        assert len(named_letters(answer)) == 2

    @pytest.mark.parametrize('answer, expected', [
        ('A dog', set()), ('I think', set()), ('I think it is B', {'B'}), ('A dog sits, so C', {'C'}),
        ('A is correct', {'A'}), ('A because it barks', {'A'}), ('I', {'I'}), ('It is A', {'A'}), ('A Dog', {'A'}),
    ])
    def test_article_and_pronoun(self, answer, expected):
        assert named_letters(answer) == expected

    @pytest.mark.parametrize('answer', ['B-52', "I'm", 'U.S.A', 'at 10 A.M', 'P(A) = 0.3', 'B.dog', 'K', '(K)', 'b'])
    def test_not_tokens(self, answer):
        assert named_letters(answer) == frozenset()


class TestCompletionLetter:
    """Edge cases: the cue's text wins over the tag; a cue naming nothing falls back to the last line; the last
    <answer> wins; ambiguity anywhere decided is None; option text needs options; no answer is None."""

    def test_cue_first(self):
        assert completion_letter('<answer>A dog runs. The answer is (B)</answer>') == 'B'
        assert completion_letter('I looked at A.\nAnswer: C') == 'C'

    def test_cue_names_nothing(self):
        assert completion_letter('Which answer is right?\nSo B.') == 'B'

    def test_last_tag(self):
        assert completion_letter('<answer>A</answer> no, <answer>B. dog</answer>') == 'B'

    def test_ambiguous(self):
        assert completion_letter('<answer>A or B</answer>') is None
        assert completion_letter('Answer: (A) (C)') is None

    def test_option_text(self):
        assert completion_letter('<answer>dog</answer>', OPTIONS) == 'B'
        assert completion_letter('<answer>dog</answer>') is None

    def test_none(self):
        assert completion_letter('') is None and completion_letter('<answer>A dog</answer>') is None


class TestAnswersMatch:
    """Edge cases: clevr-style tagged solution, numbers, mismatch, empty answers never match; multiple choice:
    every written form of the solution letter, every form of the answer, option text with each options format,
    a solution given as option text, ambiguity, the article, a wrong letter, lower case through the plain match,
    and non-letter solutions unchanged."""

    @pytest.mark.parametrize('completion, solution, expected', [
        ('<think>count</think><answer>3</answer>', '<answer> 3 </answer>', True),
        ('<answer>3.0</answer>', '3', True),
        ('<answer>circle</answer>', 'square', False),
        ('<answer></answer>', '', False),
    ])
    def test_cases(self, completion, solution, expected):
        assert answers_match(completion, solution) is expected

    @pytest.mark.parametrize('solution', ['B', '(B)', 'B.', '<answer>B</answer>'])
    @pytest.mark.parametrize('completion', ['(B)', 'B. dog', 'B) dog', 'B: dog', 'Answer: B', 'The answer is (B)',
                                            '<answer>The answer is B. dog</answer>', '<think>A dog</think><answer>(B)'
                                            '</answer>', 'I think the dog is B'])
    def test_letter_forms(self, completion, solution):
        assert answers_match(completion, solution)

    @pytest.mark.parametrize('options', [['cat', 'dog'], {'A': 'cat', 'B': 'dog'}, "['cat', 'dog']"])
    def test_option_text(self, options):
        assert answers_match('<answer>Dog.</answer>', 'B', options)
        assert not answers_match('<answer>cat</answer>', 'B', options)
        assert answers_match('<answer>(B)</answer>', 'dog', options)  # an A-OKVQA-style solution: the choice text

    @pytest.mark.parametrize('completion', ['<answer>A or B</answer>', '<answer>(A) (B)</answer>', 'Answer: B, not A',
                                            '<answer>A dog</answer>', '<answer>C</answer>', 'dog'])
    def test_not_matched(self, completion):
        assert not answers_match(completion, 'B') and not answers_match(completion, 'A')

    def test_lower_case_by_plain_match(self):
        assert answers_match('<answer>b</answer>', 'B') and not answers_match('Answer: b', 'B')

    def test_non_letter_solutions_unchanged(self):
        assert not answers_match('<answer>(red)</answer>', 'red')
        assert not answers_match('<answer>Answer: 3</answer>', '<answer> 3 </answer>')
        assert not answers_match('<answer>(3)</answer>', '3', ['1', '2', '3'])


class TestRowOptions:
    """Edge cases: `options` before `choices` per row, a None row falls to `choices`, no column, a column of
    another length or a string is ignored."""

    def test_precedence(self):
        columns = {'options': [['x'], None, None], 'choices': [['y'], ['z'], None]}
        assert row_options(columns, 3) == [['x'], ['z'], None]

    def test_absent_or_malformed(self):
        assert row_options({'solution': ['B']}, 1) == [None]
        assert row_options({'options': [['x']]}, 2) == [None, None]
        assert row_options({'choices': 'ab'}, 2) == [None, None]


class TestAnswerMatchORM:
    """Edge cases: a batch with a solution column; rows without a solution give None; multiple-choice rows with
    the options in `options` or `choices`, other keyword columns ignored."""

    def test_batch(self):
        assert AnswerMatchORM()(['<answer>red</answer>', 'blue'], solution=['red', 'red']) == [1.0, 0.0]

    def test_no_solution(self):
        assert AnswerMatchORM()(['<answer>red</answer>']) == [None]

    def test_multiple_choice(self):
        completions = ['<answer>(B)</answer>', '<answer>dog</answer>', '<answer>dog</answer>',
                       '<answer>A or B</answer>', 'B']
        columns = {'solution': ['B', 'B', 'B', 'B', None], 'options': [None, ['cat', 'dog'], None, None, None],
                   'choices': [None, None, "['cat', 'dog']", None, None], 'trainer_state': None}
        rewards = AnswerMatchORM()(completions, **columns)
        assert rewards == [1.0, 1.0, 1.0, 0.0, None]


class TestWarmupWithoutDDAPO:
    """A warm-up setting in a run whose rewards lack ddapo_attention (which installs the warm-up) stops at start,
    naming the fix: ``on_trainer_init`` on ms-swift's GRPOTrainer with the reward names it builds
    (``reward_func_names``; its args hold no --reward_funcs). Edge cases: with ddapo_attention it passes; without the
    setting it passes."""

    def test_refused(self, monkeypatch):
        from swift.rlhf_trainers.grpo_trainer import GRPOTrainer
        from ddapo.answer_match import AnswerMatchORM
        trainer = object.__new__(GRPOTrainer)
        trainer.reward_func_names = ['AnswerMatchORM', 'Format']
        monkeypatch.setenv('DDAPO_EARLY_REWARD_WEIGHTS', '1 2')
        with pytest.raises(ValueError, match='no ddapo_attention.*add ddapo_attention with weight 0'):
            AnswerMatchORM().on_trainer_init(trainer)
        trainer.reward_func_names = ['AnswerMatchORM', 'DDAPOAttentionORM']
        AnswerMatchORM().on_trainer_init(trainer)
        monkeypatch.delenv('DDAPO_EARLY_REWARD_WEIGHTS')
        trainer.reward_func_names = ['AnswerMatchORM']
        AnswerMatchORM().on_trainer_init(trainer)


class TestArticleInsideASentence:
    """The article / pronoun rule holds only where ``A`` or ``I`` opens a sentence: a second letter inside the
    answer is still a letter, so naming two is wrong. Edge cases: after a comma, after "or", a new sentence."""

    @pytest.mark.parametrize('completion, expected', [
        ('<answer>B or A looks right</answer>', 0.0), ('B, though A seems plausible', 0.0),
        ('<answer>B</answer>', 1.0), ('It is B. A dog is not shown.', 1.0), ('A dog. The answer is B', 1.0)])
    def test_second_letter(self, completion, expected):
        from ddapo.answer_match import answers_match
        assert float(answers_match(completion, 'B')) == expected
