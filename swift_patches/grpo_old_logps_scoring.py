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
the context in ``_get_per_token_logps_and_entropies`` for the call of ``_prepare_batch_inputs`` whose micro-batch has
no ``old_per_token_logps`` yet: in ms-swift 4.6 that forward always comes first, unconditionally. `apply()` is
idempotent, does nothing when the diff is installed, and raises `PatchError` on methods it does not know.
"""
import functools
import inspect
from contextvars import ContextVar
from typing import Any, Callable, ContextManager, Iterator, List, Optional, Sequence, Tuple

from swift_patches import PatchError, is_patched, require, standing  # noqa: F401 (PatchError: for callers)

CHANNEL = 'old_logps_capture'
PATCH_FLAG = '__ddapo_old_logps_scoring_patch__'
DIFF_MARKER = 'old_logps_capture'
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
    _expect(_statements(skeleton) == list(SKELETON),
            '_generate_and_score_completions is not the rollout / score / prepare / postprocess / log skeleton')
    _expect(list(inspect.signature(prepare).parameters) == ['self', 'samples'],
            f'_prepare_batch_inputs{inspect.signature(prepare)}')
    source = ' '.join(inspect.getsource(prepare).split())
    _expect('gas_chunks = self.split_by_mini_batches(samples)' in source and
            'grpo_batch.old_per_token_logps = ( self._get_per_token_logps_and_entropies( self.model, model_inputs, '
            'grpo_batch' in source, '_prepare_batch_inputs no longer runs the old log-prob forward first per '
            'split_by_mini_batches chunk')
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
        if (state is None or state[0] is not self or model is not self.model
                or getattr(grpo_batch, 'old_per_token_logps', None) is not None):
            return logps(self, model, model_inputs, grpo_batch, *args, **kwargs)
        with channel(self)(next(state[1]), model_inputs):
            return logps(self, model, model_inputs, grpo_batch, *args, **kwargs)

    for wrapper in (_generate_and_score_completions, _prepare_batch_inputs, _get_per_token_logps_and_entropies):
        setattr(wrapper, PATCH_FLAG, True)
    trainer_cls._generate_and_score_completions = _generate_and_score_completions
    trainer_cls._prepare_batch_inputs = _prepare_batch_inputs
    trainer_cls._get_per_token_logps_and_entropies = _get_per_token_logps_and_entropies
    return 'applied'
