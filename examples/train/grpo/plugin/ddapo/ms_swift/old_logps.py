"""Reading attention inside ms-swift's old log-prob forward (``DDAPO_FORWARD=old_logps``): which path a run takes and
why (`forward_path`), and `OldLogpsCapture`, the hook the third patch (``swift_patches/grpo_old_logps_scoring.py``)
enters around that forward, micro-batch by micro-batch.

GRPO's ``_prepare_batch_inputs`` encodes every sample with ``encode_sample`` (the exact ``response_token_ids``),
collates each gradient-accumulation chunk and runs a no-grad forward of the policy for ``old_per_token_logps``.
With the patch, the rewards are scored after it (nothing in it reads them), and during that forward only, the
language model's attention runs ``ddapo_over_<the trainer's implementation>``: the layer's output is the trainer's
own, and the Eq. (1) sums of the generated rows are captured as the ``rows`` path computes them. The reward then
takes them by ``request_id`` and runs no forward of its own.

    sample.encoded (the trainer's encoding) --encoding_of--> [q ; o_i], P, |o_i|, system turn --> T, V
    the chunk's samples --micro_batch_placements--> batch row, start, rows s_{i,t} - 1 (right- or left-padded, or
                        packed), each checked against the micro-batch's ids (`misplaced`) before anything is read there
    the old log-prob forward --ddapo_over_<impl>--> a LayerCapture per sample --> `Captured`, by request_id

What cannot be read exactly in a call is left uncaptured, and the reward scores those rows with forwards of its own
(counted in ddapo/own_forwards, warned once per cause): a sample whose ids are not where its placement says, a
request_id two samples share, a step whose rollout split trajectories into several samples (ms-swift sets
``dynamic_num_samples`` during that rollout, never at start), and a capture that failed inside the forward (the
trainer's forward itself is never touched by it).
"""
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from swift.model.utils import AttnImpl
from swift.utils import get_logger

from ddapo.core.key_sets import KeySets
from ddapo.core.packing import micro_batch_placements, misplaced, split_image_grids
from ddapo.core.row import Row
from ddapo.engine.capture import ForwardCapture, LayerCapture, capturing
from ddapo.ms_swift.attention import WRAPPABLE, attention_settings, language_attention, language_config, \
    wrapped_attention
from ddapo.ms_swift.encoding import (EncodedCompletion, EncodingFailed, NotEncodable, SystemTurns, generated_ids,
                                     is_trajectory, locate_completion, locate_trajectory, template_state)
from ddapo.ms_swift.forward_env import ForwardReport
from ddapo.ms_swift.model_spec import unwrap_policy

OLD_LOGPS, OWN = 'old_logps', 'own'


@dataclass(frozen=True)
class ForwardPath:
    """Where a run reads attention: ``name`` (`OLD_LOGPS` or `OWN`) and ``why`` (for the start log and the report)."""
    name: str
    why: str

    def describe(self) -> str:
        """One line for the start log, the report's header and the debug lines."""
        if self.name == OLD_LOGPS:
            return (f"old_logps ({self.why}): attention read inside ms-swift's old log-prob forward, the reward runs "
                    'no forward of its own (validation steps excepted)')
        return f"own ({self.why}): the reward runs a forward of its own after the rollout"


@dataclass(frozen=True)
class Blocker:
    """Why the old log-prob forward cannot be read exactly in this run, and the fix where there is one. ``soft``:
    a case that is exact by construction but not verified here, which ``DDAPO_FORWARD=old_logps`` may opt into."""
    what: str
    fix: str = ''
    soft: bool = False

    def __str__(self) -> str:
        return self.what + (f' (fix: {self.fix})' if self.fix else '')


def active_dropout(model: torch.nn.Module) -> List[str]:
    """Names of the modules of ``model`` that drop activations in train mode (``nn.Dropout`` with ``p > 0``), and
    the language config's ``attention_dropout`` when it is above 0: the old log-prob forward runs in train mode."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0]
    config = getattr(model, 'config', None)
    if config is not None and float(getattr(language_config(config), 'attention_dropout', 0.0) or 0.0) > 0:
        names.append('config.attention_dropout')
    return names


def old_logps_blockers(trainer) -> List[Blocker]:
    """Every reason the Eq. (1) sums read in the old log-prob forward would not be the reward's (empty: exact)."""
    from swift_patches import grpo_old_logps_scoring
    blockers = []
    if not grpo_old_logps_scoring.is_applied():
        blockers.append(Blocker(f'the ms-swift patch swift_patches/grpo_old_logps_scoring.py is not applied '
                                f'({grpo_old_logps_scoring.UNAVAILABLE or "plugin.py was not loaded"})',
                                'load examples/train/grpo/plugin/plugin.py with an ms-swift it supports, or apply '
                                'swift_patches/ms_swift_4.6_grpo_old_logps_scoring.diff'))
    from swift.rlhf_trainers.grpo_trainer import GRPOTrainer
    if not isinstance(trainer, GRPOTrainer):
        blockers.append(Blocker(f'the trainer is a {type(trainer).__name__}, not ms-swift\'s GRPOTrainer, whose old '
                                'log-prob forward the capture reads'))
    args, template = trainer.args, trainer.template
    if getattr(args, 'dynamic_sample', False):
        blockers.append(Blocker('--dynamic_sample true lets the rewards choose the groups before any forward'))
    if getattr(template, 'sequence_parallel_size', 1) > 1:
        blockers.append(Blocker('--sequence_parallel_size > 1 splits each sequence across ranks'))
    implementation = getattr(language_config(unwrap_policy(trainer).config), '_attn_implementation', None)
    if implementation not in WRAPPABLE:
        blockers.append(Blocker(f'the trainer runs attention implementation {implementation!r}; the capture wraps '
                                f'{", ".join(WRAPPABLE)}', '--attn_impl sdpa'))
    dropout = active_dropout(trainer.accelerator.unwrap_model(trainer.model))
    if dropout:
        lora = any('lora_dropout' in name for name in dropout)
        blockers.append(Blocker(f'dropout is active in the policy, and the old log-prob forward runs in train mode '
                                f'({len(dropout)} module(s), e.g. {dropout[0]})',
                                '--lora_dropout 0' if lora else 'dropout 0 in the model config'))
    if getattr(template, 'padding_free', False):
        blockers.append(Blocker('--padding_free packs the rows for flash attention, which is not verified on a GPU '
                                'yet', 'DDAPO_FORWARD=old_logps opts in', soft=True))
    return blockers


def forward_path(trainer, setting: str) -> ForwardPath:
    """The path of ``DDAPO_FORWARD=setting`` in this run: ``own`` as asked; ``old_logps`` wherever it is exact;
    under ``auto`` ``own`` otherwise, saying why. Raises ValueError, at start, when ``old_logps`` was asked for and
    cannot be exact here, naming the fix."""
    if setting == OWN:
        return ForwardPath(OWN, 'DDAPO_FORWARD=own')
    blockers = old_logps_blockers(trainer)
    if setting == OLD_LOGPS:
        hard = [b for b in blockers if not b.soft]
        if hard:
            raise ValueError('DDAPO_FORWARD=old_logps cannot read the attention exactly in this run: ' +
                             '; '.join(map(str, hard)) + '. Fix these, or set DDAPO_FORWARD=auto (or own) to let the '
                             'reward run a forward of its own.')
        return ForwardPath(OLD_LOGPS, 'DDAPO_FORWARD=old_logps' +
                           ''.join(f'; opted into: {b.what}' for b in blockers))
    if blockers:
        return ForwardPath(OWN, 'DDAPO_FORWARD=auto, falling back: ' + '; '.join(map(str, blockers)))
    return ForwardPath(OLD_LOGPS, 'DDAPO_FORWARD=auto')


def micro_batch_layout(template) -> str:
    """How ms-swift's collator lays a micro-batch out (`ddapo.core.packing.LAYOUTS`): packed under ``--padding_free``,
    else padded on ``--padding_side`` (the template's, in its training modes)."""
    if getattr(template, 'padding_free', False):
        return 'packed'
    return 'left' if getattr(template, 'padding_side', 'right') == 'left' else 'right'


def encoding_of(sample, system_turns: SystemTurns) -> EncodedCompletion:
    """``[q ; o_i]`` (or a whole trajectory) as the trainer encoded it for the old log-prob forward
    (``sample.encoded``), located as the reward's own encoding is (`locate_completion`, `locate_trajectory`). Raises
    `NotEncodable`."""
    row = Row(sample.to_reward_row())
    if is_trajectory(sample.response_token_ids, sample.response_loss_mask):
        return locate_trajectory(sample.encoded, sample.response_token_ids, sample.response_loss_mask, row,
                                 system_turns)
    return locate_completion(sample.encoded, generated_ids(sample.response_token_ids), row, system_turns)


@dataclass
class Captured:
    """One sample's attention, read in the old log-prob forward: its encoding, key sets and `LayerCapture`
    (``None`` when the forward did not capture exactly ``L_att``: ``forward`` says which layers it saw), the length
    of the micro-batch row it ran in, and what the debug report shows of that forward."""
    encoded: EncodedCompletion
    key_sets: KeySets
    capture: Optional[LayerCapture]
    forward: ForwardCapture = field(repr=False)
    length: int
    report: ForwardReport = field(repr=False)


class OldLogpsCapture:
    """The hook of ``swift_patches.grpo_old_logps_scoring``: ``capture(chunk_samples, model_inputs)`` is entered
    around the old log-prob forward of each micro-batch and leaves a `Captured` (or the `NotEncodable` error) per
    sample, by ``request_id``, for the reward call that follows (`take`). ``validating(step, mode)``: whether the
    step's reward call in that mode is a validation step (``DDAPO_VALIDATE_STEPS``, the reward's cadences): those calls
    run the reward's own forwards, so nothing is captured. What it leaves uncaptured, and why, is in the module docstring; each cause
    is warned once (`fallbacks` counts them)."""

    def __init__(self, trainer, spec, system_turns: SystemTurns, config, report_samples: int,
                 validating: Callable[[int, str], bool]):
        self.trainer, self.spec, self.system_turns, self.config = trainer, spec, system_turns, config
        self.report_samples, self.validating = report_samples, validating
        self._captured: Dict[str, Union[Captured, NotEncodable]] = {}
        self._kept = 0  # samples whose per-key attention is kept for the report, since the last `take`
        self._shared: set = set()  # request_ids several samples carried since the last `take`: none is captured
        self.fallbacks: Counter = Counter()  # samples left to the reward's own forwards, by cause, over the run

    def _step(self) -> int:
        return int(getattr(getattr(self.trainer, 'state', None), 'global_step', 0) or 0)

    def take(self) -> Dict[str, Union[Captured, NotEncodable]]:
        """What the old log-prob forwards since the last call captured, by ``request_id``; the store is emptied."""
        captured = {k: v for k, v in self._captured.items() if k not in self._shared}
        self._captured, self._kept, self._shared = {}, 0, set()
        return captured

    def _fall_back(self, cause: str, count: int, detail: str) -> None:
        """``count`` samples of this micro-batch are left to the reward's own forwards, for ``cause``; warned once per
        cause."""
        if count and cause not in self.fallbacks:
            get_logger().warning(f'[DDAPO] DDAPO_FORWARD=old_logps: {detail}; those rows are scored with forwards of '
                                 f'the reward\'s own (ddapo/own_forwards), exact as on the own path. Warned once '
                                 f'({cause}).')
        self.fallbacks[cause] += count

    @contextmanager
    def __call__(self, batch: Sequence[Any], model_inputs: Dict[str, Any]) -> Iterator[None]:
        if self.validating(self._step(), 'train' if self.trainer.model.training else 'eval'):
            yield
            return
        if getattr(self.trainer, 'dynamic_num_samples', False):  # set by this step's rollout, never at start
            self._fall_back('dynamic_num_samples', len(batch),
                            'the multi-turn scheduler split trajectories into several training samples in this '
                            'rollout (ms-swift chunks the old log-prob batch then, and the splits share a request_id)')
            yield
            return
        try:
            encodings, captures, forward, report, name = self._prepare(batch, model_inputs)
        except Exception as error:  # never the trainer's forward: these rows get a forward of their own instead
            self._fall_back('set_up', len(batch), f'the capture in the old log-prob forward could not be set up '
                                                  f'({type(error).__name__}: {error})')
            yield
            return
        config = unwrap_policy(self.trainer).config
        keys = AttnImpl.attn_impl_keys
        with language_attention(config, keys, name), capturing(forward):
            report.attention_during = attention_settings(config, keys)
            yield
        failure = getattr(forward, 'failure', None)
        if failure is not None:  # raised inside the forward and caught there: the trainer's outputs are its own
            self._fall_back('capture_failed', len(captures), f'the capture failed inside the old log-prob forward '
                                                             f'({failure})')
            captures = []
        finished = forward.finish() if forward.complete else [None] * len(captures)
        length = int(model_inputs['input_ids'].shape[-1])
        for (sample, encoded, key_sets, _), capture in zip(captures, finished):
            self._captured[str(sample.request_id)] = Captured(encoded, key_sets, capture, forward, length, report)
        for sample, encoded in zip(batch, encodings):
            if isinstance(encoded, NotEncodable):
                self._captured[str(sample.request_id)] = encoded

    def _prepare(self, batch: Sequence[Any], model_inputs: Dict[str, Any]):
        """Each sample's encoding (or why it has none), its `LayerCapture` at its place in the micro-batch, the
        forward's `ForwardCapture`, what the debug report shows, and the wrapper of the trainer's implementation.
        Samples it cannot place exactly (ids not where the placement says, a request_id seen twice) get no capture."""
        trainer = self.trainer
        encodings: List[Union[EncodedCompletion, NotEncodable]] = []
        with template_state(trainer.template):
            for sample in batch:
                try:
                    encodings.append(encoding_of(sample, self.system_turns))
                except NotEncodable as error:
                    encodings.append(error)
                except Exception as error:  # this sample only; the trainer's forward runs as it would
                    encodings.append(EncodingFailed(f'the trainer\'s encoding could not be read '
                                                    f'({type(error).__name__}: {error})'))
        self._image_grids(batch, encodings, model_inputs.get('image_grid_thw'))
        layout = micro_batch_layout(trainer.template)
        batch_ids = model_inputs['input_ids'].tolist()
        placements = micro_batch_placements([len(s.encoded['input_ids']) for s in batch],
                                            [e.prompt_len if isinstance(e, EncodedCompletion) else 0 for e in encodings],
                                            [e.num_generated if isinstance(e, EncodedCompletion) else 0
                                             for e in encodings], layout, len(batch_ids[0]))
        main = trainer.accelerator.is_main_process
        captures: List[Tuple[Any, EncodedCompletion, KeySets, LayerCapture]] = []
        wrong, shared = 0, 0
        ids = [str(sample.request_id) for sample in batch]
        for sample, encoded, placement in zip(batch, encodings, placements):
            if not isinstance(encoded, EncodedCompletion):
                continue
            if misplaced(batch_ids, placement, encoded.input_ids):
                wrong += 1
                continue
            if ids.count(str(sample.request_id)) > 1 or str(sample.request_id) in self._captured:
                self._shared.add(str(sample.request_id))  # an earlier chunk's capture of it is dropped too
                shared += 1
                continue
            key_sets = encoded.key_sets(self.spec.vision_token_ids, self.spec.special_ids)
            keep = main and self._kept < self.report_samples
            self._kept += keep
            captures.append((sample, encoded, key_sets, LayerCapture(
                key_sets, encoded.key_len, placement.rows, self.spec.attention_layers, placement.batch_index,
                keep_key_attention=keep, start=placement.start, selected=encoded.selected)))
        self._fall_back('misplaced', wrong, f'a sample\'s ids are not where the {layout} layout of the micro-batch '
                                            'places them (a layout the capture does not know)')
        self._fall_back('shared_request_id', shared, 'samples of the old log-prob forward share a request_id')
        forward = ForwardCapture([c[3] for c in captures], self.spec.attention_layers)
        config = unwrap_policy(trainer).config
        report = ForwardReport(attention_before=attention_settings(config, AttnImpl.attn_impl_keys),
                               gradient_checkpointing=getattr(trainer.model, 'is_gradient_checkpointing', None))
        name = wrapped_attention(language_config(config)._attn_implementation)
        return encodings, captures, forward, report, name

    def _image_grids(self, batch: Sequence[Any], encodings: List[Union[EncodedCompletion, NotEncodable]],
                     grids) -> None:
        """Give each encoding its own ``image_grid_thw`` (the report lays the heat maps out with it): ms-swift's
        collator takes it out of the samples' encodings into the micro-batch's, every sample's images in order."""
        if grids is None:
            return
        image_token = self.spec.image_token_id
        counts = [sum(int(t) == image_token for t in sample.encoded['input_ids']) for sample in batch]
        merge = int(self.trainer.template.processor.image_processor.merge_size)  # families with grids merge patches
        for encoded, rows in zip(encodings, split_image_grids(grids.tolist(), counts, merge)):
            if isinstance(encoded, EncodedCompletion) and rows:
                encoded.forward_kwargs = {**encoded.forward_kwargs, 'image_grid_thw': torch.tensor(rows)}
