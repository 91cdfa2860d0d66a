"""``answer_match``: 1.0 when the completion's answer equals the dataset's ``solution``, else 0.0.

ms-swift's built-in ``accuracy`` verifies LaTeX math; image question sets such as
``AI-ModelScope/clevr_cogen_a_train`` (solution ``<answer> 3 </answer>``) and the demo's shapes
(solution ``red``) need a plain answer match. The answer is the last ``<answer>...</answer>`` of the
completion, or its last line when it has no such tag (`plain_match`).

Multiple-choice sets (A-OKVQA, MMMU-Pro, ArxivQA) store the solution as an option letter. When the solution
is one capital letter A-J (also written ``(B)``, ``B.``, ``B)``, ``B:`` or inside ``<answer>``), or is the
text of exactly one option, the completion is read for the option it names (`completion_letter`), and it
scores 1.0 when that option is the solution's. The options come from the row's ``options`` column, else its
``choices`` column (`OPTION_COLUMNS`): a list of option texts in letter order, a dict letter -> text, or
either written as a Python literal string. A row without them is read by letters alone. A solution that is
neither a letter nor an option's text is matched exactly as before, and a completion the plain match
accepts is never scored lower (`answers_match`).

The rules, and where each comes from (the code is our own; the behaviour is compared, not copied):

- Letters A-J: MMMU-Pro's ten options and MMLU-Pro's answer pattern
  (MMMU-Benchmark/MMMU ``mmmu-pro/evaluate.py``; TIGER-AI-Lab/MMLU-Pro ``compute_accuracy.py``).
- Option forms ``(B)`` and ``B.``: MMMU's ``parse_multi_choice_response`` (EvolvingLMMs-Lab/lmms-eval
  ``lmms_eval/tasks/mmmu/utils.py``, from the MMMU repository's ``eval/eval_utils.py``). ``B)`` and ``B:``:
  VLMEvalKit's ``can_infer_option`` (open-compass/VLMEvalKit ``vlmeval/utils/matching_util.py``), which treats
  brackets, ``.``, ``:`` and ``*`` as separators, so a letter counts only as a whole token.
- The text after the last ``Answer:`` is read first: MMMU-Pro's ``parse_multi_choice_response``
  (``mmmu-pro/evaluate.py``); ``answer is (B)``: MMLU-Pro's ``extract_answer`` (``compute_accuracy.py``).
- Two different letters named as the answer give no answer (wrong): VLMEvalKit's ``can_infer_option`` (a
  count of one letter is required) and MMMU-Pro's unique match after ``Answer:``. MMMU instead takes the last
  candidate, and a random letter when it finds none; a reward must not guess, so neither is done here.
- A bare ``A`` or ``I`` opening a sentence before a lower-case word is the article or the pronoun (``A dog``,
  ``I think``; inside a sentence, ``B or A looks right``, it is a letter): VLMEvalKit flags ``A`` as a possible quantifier; the exact rule (`named_letters`) is ours.
- The option text alone names its option when it equals exactly one option: A-OKVQA scores a
  multiple-choice prediction by equality with ``choices[correct_choice_idx]`` (allenai/aokvqa
  ``evaluation/eval_predictions.py``). VLMEvalKit (``can_infer_text``) and MMMU accept a contained option text;
  that is not done here, since a sentence that mentions an option is not an answer.
- Options as a list in letter order from A: MMMU's ``get_multi_choice_info``; MMMU and MMMU-Pro store
  ``options`` as a list written as a string, read with ``ast.literal_eval`` (lmms-eval's ``construct_prompt``,
  MMMU-Pro's ``mmmu_process_results``); A-OKVQA's column is ``choices``.
"""
import ast
import os
import re
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence

from swift.rewards import ORM

_ANSWER = re.compile(r'<answer>(.*?)</answer>', re.DOTALL)
# a letter as a whole token: not inside a word, a hyphenation, an abbreviation (U.S.A., A.M.) or a call (P(A));
# "(B)", "B.", "B)" and "B:" carry a mark, a plain "B" none
_MENTION = re.compile(r"(?<![\w'’.\-])(?<!\w\()(?P<open>\()?(?P<letter>[A-J])"
                      r"(?:(?P<mark>[.:)])(?![\w'’\-])|(?![\w'’\-.:)]))")
# the lower-case word after a bare "A" / "I"; these few words follow a letter, never the article or the pronoun
_NEXT_WORD = re.compile(r"\s+([a-z]+)")
_LETTER_WORDS = frozenset({'or', 'and', 'is', 'because'})
_CUE = re.compile(r"\banswer\b\s*(?:is\b\s*[:：]?|[:：])", re.IGNORECASE)
_SOLUTION_LETTER = re.compile(r"\(([A-J])\)|([A-J])[.:)]?")
_STRIP = ' .,;:!?"\''
OPTION_COLUMNS = ('options', 'choices')


def _normalize(text: str) -> str:
    """Whitespace collapsed, outer punctuation stripped, lower case: how two answers are compared."""
    return ' '.join(text.split()).strip(_STRIP).lower()


def extract_answer(text: str) -> str:
    """Example: ``'<think>...</think><answer> Red. </answer>'`` gives ``'red'``; ``'it is\\n3'`` gives ``'3'``."""
    tagged = _ANSWER.findall(text)
    answer = tagged[-1] if tagged else (text.strip().splitlines() or [''])[-1]
    return _normalize(answer)


def plain_match(completion: str, solution: str) -> bool:
    """Equal after `extract_answer`, or equal as numbers; an empty answer never matches.

    >>> plain_match('<answer>Red.</answer>', 'red'), plain_match('<answer>3.0</answer>', '<answer> 3 </answer>')
    (True, True)
    >>> plain_match('<answer></answer>', '')
    False
    """
    answer, expected = extract_answer(completion), extract_answer(solution)
    if answer == expected:
        return bool(answer)
    try:
        return float(answer) == float(expected)
    except ValueError:
        return False


def parse_options(value: object) -> Dict[str, str]:
    """A row's options as letter -> text: a list in letter order from A, a dict, or either as a literal string.

    Texts keep their case; a text that starts with its own letter (``'B) dog'`` for B) loses that prefix.
    Letters past J, keys that are not one letter, and values of any other kind are left out.

    >>> parse_options(['cat', 'dog'])
    {'A': 'cat', 'B': 'dog'}
    >>> parse_options({'b': 'dog', 'A': 'cat', 'note': 'x'})
    {'B': 'dog', 'A': 'cat'}
    >>> parse_options("['cat', 'dog']")  # MMMU / MMMU-Pro store the list as a string
    {'A': 'cat', 'B': 'dog'}
    >>> parse_options(['A) cat', 'B) dog'])
    {'A': 'cat', 'B': 'dog'}
    >>> parse_options(None), parse_options('not a list'), parse_options(3)
    ({}, {}, {})
    """
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return {}
    if hasattr(value, 'tolist'):  # a numpy array from a pandas-loaded column
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        pairs = zip('ABCDEFGHIJ', value)
    elif isinstance(value, Mapping):
        pairs = ((str(key).strip().upper(), text) for key, text in value.items())
    else:
        return {}
    options = {}
    for letter, text in pairs:
        if len(letter) == 1 and 'A' <= letter <= 'J' and text is not None:
            text = str(text).strip()
            # ArxivQA-style texts repeat their own letter; compare the text after it
            options[letter] = re.sub(rf"^(?:\({letter}\)|{letter}[.:)])\s+", '', text) or text
    return options


def _option_letters(text: str, options: Mapping[str, str]) -> FrozenSet[str]:
    """The letters whose option text equals ``text`` after `_normalize` (A-OKVQA's exact choice match)."""
    wanted = _normalize(text)
    return frozenset(letter for letter, option in options.items() if wanted and _normalize(option) == wanted)


def solution_letter(solution: str, options: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The option a solution names: one capital A-J, bare or as ``(B)``, ``B.``, ``B)``, ``B:``, also in ``<answer>``.

    With options, a solution that is the text of exactly one option names that option. Lower case is not a
    letter here (``'b'`` stays a plain answer); anything else gives None (matched by `plain_match` alone).

    >>> [solution_letter(s) for s in ['B', '(B)', 'B.', '<answer> B </answer>', 'b', 'red', '3', 'AB']]
    ['B', 'B', 'B', 'B', None, None, None, None]
    >>> solution_letter('dog', {'A': 'cat', 'B': 'Dog'}), solution_letter('cow', {'A': 'cat', 'B': 'dog'})
    ('B', None)
    """
    tagged = _ANSWER.findall(solution)
    body = (tagged[-1] if tagged else solution).strip()
    found = _SOLUTION_LETTER.fullmatch(body)
    if found:
        return found.group(1) or found.group(2)
    letters = _option_letters(body, options or {})
    return next(iter(letters)) if len(letters) == 1 else None


def answer_spans(completion: str) -> List[str]:
    """Where the answer is read, first to last: the text after the last ``Answer:`` / ``answer is``, then the
    whole last ``<answer>`` (or, untagged, the last line). ``*`` (markdown bold) is dropped, whitespace
    collapsed, outer quotes and closing punctuation stripped; the cue's text ends at its line.

    >>> answer_spans('<think>x</think><answer>**B**</answer>')
    ['B']
    >>> answer_spans('The answer is (B).\\nThe dog is brown.')
    ['(B)', 'The dog is brown']
    >>> answer_spans('<answer>Answer:\\n B. dog\\n</answer>')
    ['B. dog', 'Answer: B. dog']
    """
    tagged = _ANSWER.findall(completion)
    body = (tagged[-1] if tagged else completion).replace('*', '')
    spans = []
    cues = list(_CUE.finditer(body))
    if cues:
        spans.append(body[cues[-1].end():].strip().split('\n', 1)[0])
    # the tag's whole content, or the last line: what `extract_answer` reads
    spans.append(body if tagged else (body.strip().splitlines() or [''])[-1])
    return [' '.join(span.split()).rstrip(_STRIP).lstrip(' "\'') for span in spans]


def named_letters(answer: str, options: Optional[Mapping[str, str]] = None) -> FrozenSet[str]:
    """The option letters an answer names; one is an answer, two or more are ambiguous, none is no answer.

    1. Lead: an answer that is a letter, or starts with a marked one (``(B)``, ``B.``, ``B)``, ``B:``), names
       it; the rest is its option text. A rest equal to another option's text, or holding another marked
       letter, names that one too.
    2. Else, with options, an answer equal to an option's text names it.
    3. Else every letter standing as a whole token is named, except a bare ``A`` / ``I`` followed by a
       lower-case word other than ``or``, ``and``, ``is``, ``because`` (the article, the pronoun). Letters
       inside words, hyphenations or abbreviations (``B-52``, ``I'm``, ``U.S.A.``) are not tokens.

    >>> [sorted(named_letters(a)) for a in ['B', '(B)', 'B. dog', 'B) dog', 'B: dog']]
    [['B'], ['B'], ['B'], ['B'], ['B']]
    >>> sorted(named_letters('B. cat', {'A': 'cat', 'B': 'dog'})), sorted(named_letters('(A) (C)'))
    (['A', 'B'], ['A', 'C'])
    >>> sorted(named_letters('Dog', {'A': 'cat', 'B': 'dog'}))
    ['B']
    >>> sorted(named_letters('A or B')), sorted(named_letters('I think it is B')), sorted(named_letters('A dog'))
    (['A', 'B'], ['B'], [])
    >>> sorted(named_letters('B or A looks right')), sorted(named_letters('B, though A seems plausible'))
    (['A', 'B'], ['A', 'B'])
    """
    options = options or {}
    lead = _MENTION.match(answer)
    if lead and (lead.group('mark') or lead.end() == len(answer)):
        letter, rest = lead.group('letter'), answer[lead.end():].strip()
        texts = _option_letters(rest, options)
        if letter in texts:  # "B. Vitamin C": B's own text, whatever letters it holds
            return frozenset(letter)
        marked = {m.group('letter') for m in _MENTION.finditer(rest) if m.group('mark')}
        return frozenset({letter}) | texts | marked
    texts = _option_letters(answer, options)
    if texts:
        return texts
    letters = set()
    for mention in _MENTION.finditer(answer):
        letter = mention.group('letter')
        before = answer[:mention.start()].rstrip()
        # the article or pronoun opens a sentence ("A dog", "I think"); inside one ("B or A looks right") it is a letter
        opens = not before or before[-1] in '.!?'
        if letter in 'AI' and not (mention.group('open') or mention.group('mark')) and opens:
            word = _NEXT_WORD.match(answer, mention.end())
            if word and word.group(1) not in _LETTER_WORDS:
                continue
        letters.add(letter)
    return frozenset(letters)


def completion_letter(completion: str, options: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The one option a completion answers, or None (no option named, or two or more).

    The `answer_spans` are read in order and the first that names any letter decides (`named_letters`): the
    text after ``Answer:`` wins over the rest of the tag or last line, unless it names nothing.

    >>> completion_letter('<think>x</think><answer>The answer is (B) dog</answer>')
    'B'
    >>> completion_letter('The question asks which answer is right.\\nSo B.')
    'B'
    >>> completion_letter('<answer>A or B</answer>') is None, completion_letter('Answer: B, not C') is None
    (True, True)
    >>> completion_letter('<answer>dog</answer>', {'A': 'cat', 'B': 'dog'})
    'B'
    """
    for span in answer_spans(completion):
        letters = named_letters(span, options)
        if letters:
            return next(iter(letters)) if len(letters) == 1 else None
    return None


def answers_match(completion: str, solution: str, options: object = None) -> bool:
    """`plain_match`, or, when the solution names an option (`solution_letter`), the completion names that one.

    ``options`` is the row's raw column value (`parse_options`).

    >>> answers_match('<answer>(B)</answer>', 'B'), answers_match('Answer: B. dog', '<answer>B</answer>')
    (True, True)
    >>> answers_match('<answer>dog</answer>', 'B', ['cat', 'dog']), answers_match('<answer>(A) (B)</answer>', 'B')
    (True, False)
    >>> answers_match('<answer>3.0</answer>', '<answer> 3 </answer>'), answers_match('blue', 'red')
    (True, False)
    """
    if plain_match(completion, solution):
        return True
    choices = parse_options(options)
    letter = solution_letter(solution, choices)
    return letter is not None and completion_letter(completion, choices) == letter


def row_options(columns: Mapping[str, object], size: int) -> List[object]:
    """Each row's options: its ``options`` value, else its ``choices`` value, else None.

    ms-swift passes every dataset column as a keyword argument holding one value per completion (None where
    a row lacks the column); a column of another length is ignored.

    >>> row_options({'options': [['cat', 'dog'], None], 'choices': [None, ['x', 'y']]}, 2)
    [['cat', 'dog'], ['x', 'y']]
    >>> row_options({'solution': ['B']}, 1), row_options({'choices': 'cat'}, 2)
    ([None], [None, None])
    """
    rows: List[object] = [None] * size
    for name in reversed(OPTION_COLUMNS):  # the first column named wins: written last
        column = columns.get(name)
        if isinstance(column, Sequence) and not isinstance(column, str) and len(column) == size:
            rows = [value if value is not None else row for value, row in zip(column, rows)]
    return rows


class AnswerMatchORM(ORM):
    """Accuracy reward for image question sets with a ``solution`` column; ``None`` where a row has none.

    Multiple-choice rows may carry their options in an ``options`` or ``choices`` column (`row_options`).

    At start (``on_trainer_init``, which the reward-kwargs patch calls once the trainer has built its rewards) it
    refuses a reward-weight warm-up (``DDAPO_EARLY_REWARD_WEIGHTS``) in a run without ``ddapo_attention``, whose
    setting that is: nothing would apply it.
    """

    def on_trainer_init(self, trainer) -> None:
        names = list(getattr(trainer, 'reward_func_names', None) or [])
        if os.environ.get('DDAPO_EARLY_REWARD_WEIGHTS') and 'DDAPOAttentionORM' not in names:
            raise ValueError('DDAPO_EARLY_REWARD_WEIGHTS is set, and --reward_funcs has no ddapo_attention, whose '
                             'setting it is (the warm-up is installed by that reward): add ddapo_attention with weight '
                             f'0 to --reward_funcs and --reward_weights, or unset DDAPO_EARLY_REWARD_WEIGHTS (rewards: '
                             f'{", ".join(names)}).')

    def __call__(self, completions: List[str], solution: Optional[List[str]] = None, **kwargs) -> List[Optional[float]]:
        solutions = solution or [None] * len(completions)
        options = row_options(kwargs, len(completions))
        return [None if s is None else float(answers_match(c, str(s), o))
                for c, s, o in zip(completions, solutions, options)]
