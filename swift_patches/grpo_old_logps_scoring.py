"""Runtime form of ``ms_swift_4.6_grpo_old_logps_scoring.diff``: rewards scored after the old log-prob forward, and a
hook around that forward, so that a reward can read what the forward computed instead of running one of its own.

ms-swift 4.6's GRPO step (``RolloutTrainerMixin._generate_and_score_completions``) runs the rollout, the rewards
(``_score_completions``), ``_prepare_batch_inputs`` (encoding, collation, and per micro-batch the no-grad forward of
the policy for ``old_per_token_logps``, then the reference and teacher forwards), the advantages
(``_postprocess_batch``) and the logs. With this patch, once a reward has opened the channel
(``trainer.old_logps_capture``, a callable ``(chunk_samples, model_inputs) -> context manager``):

- ``_prepare_batch_inputs`` runs before ``_score_completions``. Nothing in it reads the rewards; only
  ``_postprocess_batch`` does (``self._rewards_per_func``), and it still runs after them. The reward sets the channel
  only where that holds (never with ``--dynamic_sample``, whose rewards choose the groups before any forward);
- the old log-prob forward of each micro-batch runs inside the channel's context, entered with that micro-batch's
  samples; the reference and teacher forwards never do.

Without the channel, the step is stock ms-swift. The diff does this inside the two methods; the runtime patch,
which cannot edit them, reorders the skeleton (checked line by line against the one it was written for) and enters
the context in ``_get_per_token_logps_and_entropies`` for the one call the diff wraps: the call made from the
statement ``grpo_batch.old_per_token_logps = self._get_per_token_logps_and_entropies(self.model, model_inputs,
grpo_batch, ...)[0]`` of the stock ``_prepare_batch_inputs``, found with `ast` at apply time and recognised at call
time by the caller's code object and line. What the call looks like cannot tell it apart: the OPSD / self-distillation
teacher forward (``_compute_teacher_logps``) also runs ``self.model`` on a batch without ``old_per_token_logps``.
`apply()` is idempotent, does nothing when the diff is installed, and raises `PatchError` on methods it does not know.
"""
import ast
import functools
import inspect
import sys
import textwrap
from contextvars import ContextVar
from types import CodeType, FrameType
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

# PatchError: for callers
from swift_patches import PatchError, is_patched, refuse_earlier_diff, require, standing  # noqa: F401

CHANNEL = 'old_logps_capture'
PATCH_FLAG = '__ddapo_old_logps_scoring_patch__'
DIFF_MARKER = 'old_logps_capture'
# Earlier versions of the diff, as in grpo_reward_kwargs: none, the diff is as commit caaf4b8 shipped it.
EARLIER_DIFF_MARKERS: Dict[str, Tuple[str, str]] = {}
# Why the patch could not be applied in this process (plugin.py records it), for the reward's start log.
UNAVAILABLE: Optional[str] = None
# The stock skeleton the runtime patch reorders, as ms-swift 4.6 writes it.
SKELETON = ('samples = self._rollout_samples(inputs)', 'samples = self._score_completions(samples)',
            'batch_encoded_inputs = self._prepare_batch_inputs(samples)',
            'self._postprocess_batch(samples, batch_encoded_inputs)', 'self._log_rollout(samples)',
            'return batch_encoded_inputs')
# (trainer, the micro-batches of the running _prepare_batch_inputs, in order) while it runs
_CHUNKS: ContextVar[Optional[Tuple[Any, Iterator[List[Any]]]]] = ContextVar('ddapo_old_logps_chunks', default=None)

Capture = Callable[[Sequence[Any], Any], ContextManager[None]]


def _expect(condition: bool, what: str) -> None:
    require(condition, 'grpo_old_logps_scoring', what)


def open_channel(trainer, capture: Capture) -> None:
    """Score ``trainer``'s rewards after the old log-prob forward and enter ``capture(chunk_samples, model_inputs)``
    around that forward of each micro-batch. Only this module and the diff name the attribute."""
    setattr(trainer, CHANNEL, capture)


def channel(trainer) -> Optional[Capture]:
    return getattr(trainer, CHANNEL, None)


def _statements(method: Callable) -> List[str]:
    lines = inspect.getsource(method).split('"""')[-1].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith('#')]


def _is_old_logps_forward(node: ast.AST) -> bool:
    """Whether ``node`` is ``grpo_batch.old_per_token_logps = self._get_per_token_logps_and_entropies(self.model,
    model_inputs, grpo_batch, ...)[0]`` (parentheses and keyword arguments as they may be)."""
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1
            and ast.unparse(node.targets[0]) == 'grpo_batch.old_per_token_logps'):
        return False
    value = node.value
    if not (isinstance(value, ast.Subscript) and ast.unparse(value.slice) == '0' and isinstance(value.value, ast.Call)):
        return False
    call = value.value
    return (ast.unparse(call.func) == 'self._get_per_token_logps_and_entropies'
            and [ast.unparse(arg) for arg in call.args[:3]] == ['self.model', 'model_inputs', 'grpo_batch'])


def _once_per_chunk(path: Sequence[ast.AST]) -> bool:
    """Whether a statement under ``path`` (its ancestors, outermost first) runs once per iteration of ``for batch in
    gas_chunks`` and nowhere else: inside that loop, with only ``with`` blocks between."""
    loops = [i for i, node in enumerate(path) if isinstance(node, (ast.For, ast.While, ast.AsyncFor))]
    if len(loops) != 1:
        return False
    loop = path[loops[0]]
    return (isinstance(loop, ast.For) and ast.unparse(loop.target) == 'batch'
            and ast.unparse(loop.iter) == 'gas_chunks' and all(isinstance(n, ast.With) for n in path[loops[0] + 1:]))


def _walk(node: ast.AST, path: Tuple[ast.AST, ...] = ()) -> Iterator[Tuple[ast.AST, Tuple[ast.AST, ...]]]:
    """Every node under ``node`` with its ancestors, outermost first."""
    for child in ast.iter_child_nodes(node):
        yield child, path
        yield from _walk(child, path + (child,))


def old_logps_call_site(prepare: Callable) -> Tuple[CodeType, range]:
    """The code object of the stock ``_prepare_batch_inputs`` under ``prepare`` (ms-swift's profiling wrapper
    unwrapped) and the file lines of its old log-prob forward statement (`_is_old_logps_forward`). Raises `PatchError`
    unless there is exactly one, run once per ``split_by_mini_batches`` chunk."""
    function = inspect.unwrap(prepare)
    lines, first = inspect.getsourcelines(function)
    tree = ast.parse(textwrap.dedent(''.join(lines)))
    found = [(node, path) for node, path in _walk(tree) if _is_old_logps_forward(node)]
    _expect(len(found) == 1, f'_prepare_batch_inputs has {len(found)} statements grpo_batch.old_per_token_logps = '
            'self._get_per_token_logps_and_entropies(self.model, model_inputs, grpo_batch, ...)[0], not one')
    node, path = found[0]
    _expect(_once_per_chunk(path), '_prepare_batch_inputs no longer runs the old log-prob forward once per '
            '`for batch in gas_chunks` micro-batch')
    return function.__code__, range(first + node.lineno - 1, first + node.end_lineno)


def called_from(code: CodeType, lines: range, frame: Optional[FrameType]) -> bool:
    """Whether the nearest frame of ``code`` up the stack from ``frame`` is running one of ``lines``: the call comes
    from that statement, directly or through wrappers in between (a subclass's override calling super(), say)."""
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame is not None and frame.f_lineno in lines


def is_applied() -> bool:
    """True when GRPO scores after the old log-prob forward once the channel is open (runtime patch or diff)."""
    from swift.rlhf_trainers import grpo_trainer
    return is_patched(grpo_trainer.GRPOTrainer._prepare_batch_inputs, PATCH_FLAG, DIFF_MARKER)


def apply() -> str:
    """Patch ms-swift's GRPO trainer in this process. Returns ``'applied'``, ``'already applied'`` or
    ``'diff installed'``; raises `PatchError` when ms-swift is not the version this patch knows."""
    from swift.rlhf_trainers import grpo_trainer
    trainer_cls = grpo_trainer.GRPOTrainer
    prepare = getattr(trainer_cls, '_prepare_batch_inputs', None)
    logps = getattr(trainer_cls, '_get_per_token_logps_and_entropies', None)
    skeleton = getattr(trainer_cls, '_generate_and_score_completions', None)
    _expect(None not in (prepare, logps, skeleton), 'GRPOTrainer has no _prepare_batch_inputs / '
            '_get_per_token_logps_and_entropies / _generate_and_score_completions')
    state = standing(prepare, PATCH_FLAG, DIFF_MARKER)
    if state is not None:
        return state
    refuse_earlier_diff(prepare, 'grpo_old_logps_scoring', EARLIER_DIFF_MARKERS)
    _expect(_statements(skeleton) == list(SKELETON),
            '_generate_and_score_completions is not the rollout / score / prepare / postprocess / log skeleton')
    _expect(list(inspect.signature(prepare).parameters) == ['self', 'samples'],
            f'_prepare_batch_inputs{inspect.signature(prepare)}')
    source = ' '.join(inspect.getsource(prepare).split())
    _expect('gas_chunks = self.split_by_mini_batches(samples)' in source,
            '_prepare_batch_inputs no longer splits the samples with split_by_mini_batches')
    prepare_code, old_logps_lines = old_logps_call_site(prepare)
    _expect(list(inspect.signature(logps).parameters)[:4] == ['self', 'model', 'model_inputs', 'grpo_batch'],
            f'_get_per_token_logps_and_entropies{inspect.signature(logps)}')

    @functools.wraps(skeleton)
    def _generate_and_score_completions(self, inputs):
        if channel(self) is None:
            return skeleton(self, inputs)
        samples = self._rollout_samples(inputs)
        batch_encoded_inputs = self._prepare_batch_inputs(samples)  # the old log-prob forward: attention read
        samples = self._score_completions(samples)  # the rewards, from it; nothing above read them
        self._postprocess_batch(samples, batch_encoded_inputs)
        self._log_rollout(samples)
        return batch_encoded_inputs

    @functools.wraps(prepare)
    def _prepare_batch_inputs(self, samples):
        if channel(self) is None:
            return prepare(self, samples)
        # the micro-batches prepare makes, in its order (sequence parallelism, which gathers here, never opens it)
        token = _CHUNKS.set((self, iter(self.split_by_mini_batches(samples))))
        try:
            return prepare(self, samples)
        finally:
            _CHUNKS.reset(token)

    @functools.wraps(logps)
    def _get_per_token_logps_and_entropies(self, model, model_inputs, grpo_batch, *args, **kwargs):
        state = _CHUNKS.get()
        # the old log-prob forward is known by where it is called from, never by its arguments (the teacher forward
        # of OPSD runs self.model on a batch without old log-probs too)
        if (state is None or state[0] is not self
                or not called_from(prepare_code, old_logps_lines, sys._getframe(1))):
            return logps(self, model, model_inputs, grpo_batch, *args, **kwargs)
        with channel(self)(next(state[1]), model_inputs):
            return logps(self, model, model_inputs, grpo_batch, *args, **kwargs)

    for wrapper in (_generate_and_score_completions, _prepare_batch_inputs, _get_per_token_logps_and_entropies):
        setattr(wrapper, PATCH_FLAG, True)
    trainer_cls._generate_and_score_completions = _generate_and_score_completions
    trainer_cls._prepare_batch_inputs = _prepare_batch_inputs
    trainer_cls._get_per_token_logps_and_entropies = _get_per_token_logps_and_entropies
    return 'applied'
