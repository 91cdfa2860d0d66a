"""The reward's forwards: which outputs run together, and every rank running as many. One call,
`ForwardScheduler.run(outputs, env)`; no ms-swift: the trainer comes in as a `ForwardEnvironment` (forward, gather,
padding encoding, whether forwards are collective), which the ms-swift side's `PolicyForwards` implements.

    Outputs --units---> one forward per output (DDAPO_ATTENTION=eager, rows; a hybrid model under shared), or per
                        prompt (shared: the outputs sharing a prompt, up to DDAPO_PACK_TOKENS, ddapo.core.packing)
            --lockstep-> padding forwards, agreed before the first forward, where a forward is a collective of all
                         ranks (ZeRO-3, FSDP: ForwardEnvironment.collective)
            --run-------> a `ForwardRun` per unit: one forward with attention captured (ddapo.engine.capture), its
                          per-output `LayerCapture`, or why there is none (out of memory)
"""
import gc
from dataclasses import dataclass, field
from typing import Any, Collection, List, Optional, Protocol

import torch

from ddapo.engine.capture import (EAGER_ATTENTION, ROWS_ATTENTION, CapturedForward, ForwardCapture, LayerCapture,
                                  captured_forward, forward_inputs)
from ddapo.core.config import DDAPOConfig
from ddapo.core.key_sets import KeySets
from ddapo.core.packing import Encoded, PackMember, shared_prompt_units
from ddapo.core.row import Row
from ddapo.core.validity import masked_prompt, token_visual_dependency


VALIDATION_ROWS = 128  # rows per chunk of Eq. (12): 128 x 152k-token vocabularies, ~75 MiB per float32 temporary


@dataclass
class Output:
    """One completion of the reward call, encoded: ``position`` in the call's completions, its row, the template's
    encoding ``[q ; o_i]`` (``ddapo.ms_swift.encoding.EncodedCompletion``) and its key sets."""
    position: int
    row: Row = field(repr=False)
    encoded: Encoded = field(repr=False)
    key_sets: KeySets = field(repr=False)

    @property
    def generated(self) -> List[int]:
        return self.encoded.generated


@dataclass
class ForwardRun:
    """One forward of a unit of outputs, and its captures in the unit's order. ``out_of_memory``: the forward ran out
    of memory (``captures`` None, ``detail`` says so); otherwise ``complete`` says whether every attention layer
    of ``L_att`` was captured (``captures`` None when not)."""
    unit: List[Output]
    captures: Optional[List[LayerCapture]]
    capture: Optional[ForwardCapture] = None
    model_outputs: Any = None
    length: int = 0
    detail: str = ''
    out_of_memory: bool = False
    # on a validation step: D_{i,t} (Eq. 12) per output in the unit's order, None where the masked forward ran out of
    # memory (validation_detail says so) or the run is incomplete
    dependencies: Optional[List[Optional[torch.Tensor]]] = None
    validation_detail: str = ''
    # what the debug report shows of the forward that ran it, when that forward was not the reward's own (the old
    # log-prob forward); None: the call's own forward context
    report: Any = None
    # why the unit failed otherwise (an error while its inputs were laid out, or after its forward): its outputs are
    # None, the call goes on
    failure: str = ''

    @property
    def complete(self) -> bool:
        return not self.out_of_memory and not self.failure and self.capture is not None and self.capture.complete


class ForwardEnvironment(Protocol):
    """What the engine needs of the trainer for one call's forwards (the ms-swift side's `PolicyForwards` is one)."""
    collective: bool  # a forward is a collective of all ranks (ZeRO-3, FSDP, sequence parallelism)

    def forward(self, **kwargs) -> Any:
        """One no-grad forward of the policy on collated forward kwargs."""

    def gather(self, values: List[Any]) -> List[Any]:
        """Every rank's ``values``, concatenated in rank order (a collective)."""

    def padding_encoding(self) -> PackMember:
        """A minimal encoding to run a padding forward on."""


@dataclass
class ForwardCall:
    """The forwards of one reward call: a `ForwardRun` per unit, and the padding forwards this rank ran."""
    runs: List[ForwardRun]
    padding: int = 0


class ForwardScheduler:
    """Plans and runs the forwards of one reward call (``shared``, ``rows`` or ``eager``: ``attention``, by default
    `DDAPOConfig.attention`; the self-check's reference and a path it moved away from set it)."""

    def __init__(self, config: DDAPOConfig, attention_layers, hybrid: bool, attention: Optional[str] = None):
        self.config, self.attention_layers, self.hybrid = config, tuple(attention_layers), hybrid
        self.attention = attention or config.attention
        self.padding_forwards = 0  # run by this rank to keep in step with busier ranks, over the run
        self.last_forwards = self.last_padding = 0  # of the last call: its forwards, its padding forwards

    @property
    def implementation(self) -> str:
        """The attention function the reward forwards run: the eager reference, or sdpa with eager rows."""
        return EAGER_ATTENTION if self.attention == 'eager' else ROWS_ATTENTION

    @property
    def packs(self) -> bool:
        """Whether outputs of one prompt share a forward. Not in a hybrid model (linear-attention layers): a linear
        layer carries its state along the whole sequence, so no mask keeps one packed output from seeing another."""
        return self.attention == 'shared' and not self.hybrid

    def units(self, outputs: List[Output]) -> List[List[Output]]:
        """The forwards of this call, each a list of outputs, in order."""
        if not self.packs:
            return [[output] for output in outputs]
        single = [o for o in outputs if o.encoded.selected is None]  # a trajectory runs alone: it is no [q ; o_i]
        return [[single[i] for i in unit]
                for unit in shared_prompt_units([o.encoded for o in single], self.config.pack_tokens)] + [
            [o] for o in outputs if o.encoded.selected is not None]

    def run(self, outputs: List[Output], env: ForwardEnvironment, report: Collection[int] = (),
            validate: bool = False) -> ForwardCall:
        """Run the forwards of ``outputs`` in ``env``, one `ForwardRun` per unit, then the padding forwards; a run that
        did not capture exactly ``L_att`` is returned as incomplete (the caller stops the run after the call, when
        every rank has run as many forwards). ``report``: positions whose per-key attention the report shows.
        ``validate`` (a validation step, the same on every rank): each unit runs a second forward on its masked prompt
        ``x~`` (Eq. 12), and every output of a complete run gets its ``D_{i,t}`` (`ForwardRun.dependencies`).

        Where forwards are collective (``env.collective``) the count of forwards is agreed with ``env.gather`` before
        the first forward, since under ZeRO-3 a rank that ran fewer forwards than the others (fewer rows, rows that
        could not be encoded) would hang them all, and the gather itself must not meet another rank's forward. A
        rank with fewer units than the busiest runs as many padding forwards as those units would have run (two
        per unit on a validation step), on its first output's encoding (``env.padding_encoding()`` when it has none).

        A unit that fails outside its forwards (its inputs cannot be laid out, its capture cannot be finished) is a
        `ForwardRun` with ``failure`` set, and the forwards it did not run are run as padding: the count agreed with
        the other ranks holds whatever happens between forwards. An error inside a forward is raised (the call stops
        on every rank after the gather; under ZeRO-3 a forward is itself a collective, which no reward can repair).
        """
        try:
            units = self.units(outputs)
        except Exception:  # before the count's gather, which every rank must join: one output per forward is exact
            units = [[output] for output in outputs]
        per_unit = 2 if validate else 1
        padding = (max(env.gather([len(units)])) - len(units)) * per_unit if env.collective else 0
        runs, ran = [], [0]

        def forward(**kwargs):
            ran[0] += 1
            try:
                return env.forward(**kwargs)
            except Exception as error:
                error.ddapo_inside_forward = True  # a failing forward stops the call (raised on every rank after it)
                raise

        for unit in units:
            before = ran[0]
            try:
                runs.append(self._run_unit(forward, unit, report, validate))
            except Exception as error:
                if getattr(error, 'ddapo_inside_forward', False):
                    raise
                # between forwards: this unit's outputs are None, and the other ranks' count of forwards still holds
                runs.append(ForwardRun(unit, None, failure=f'{type(error).__name__}: {error}'))
                padding += max(0, per_unit - (ran[0] - before))
        if padding:
            kwargs = (outputs[0].encoded if outputs else env.padding_encoding()).forward_kwargs
            for _ in range(padding):
                env.forward(**kwargs)
        self.padding_forwards += padding
        self.last_forwards, self.last_padding = ran[0], padding
        return ForwardCall(runs, padding)

    def _out_of_memory(self, error: torch.OutOfMemoryError, length: int, what: str) -> str:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        first_line = (str(error).splitlines() or ['no message'])[0][:200]  # an OutOfMemoryError may have none
        detail = f'{what} of a {length}-token sequence ran out of memory ({first_line})'
        if self.attention == 'shared':
            detail += '; a lower DDAPO_PACK_TOKENS packs fewer outputs per forward'
        return detail

    def _run_unit(self, forward, unit: List[Output], report: Collection[int], validate: bool) -> ForwardRun:
        members, pack = [o.encoded for o in unit], len(unit) > 1  # shared: a lone output keeps its plain sequence
        try:
            captured = captured_forward(forward, members, [o.key_sets for o in unit], self.attention_layers, pack=pack,
                                        key_attention=[o.position in report for o in unit], keep_logits=validate)
        except torch.OutOfMemoryError as error:
            length = unit[0].encoded.prompt_len + sum(o.encoded.num_generated for o in unit)
            run = ForwardRun(unit, None, length=length, out_of_memory=True,
                             detail=self._out_of_memory(error, length, 'the reward forward'))
            if validate:  # this rank's count of forwards stays the others' (ZeRO-3 lockstep)
                self._masked_logits(forward, forward_inputs(members, pack)[0], length)
            return run
        capture = captured.capture
        captures = capture.finish() if capture.complete else None
        run = ForwardRun(unit, captures, capture, captured.model_outputs, captured.length)
        if validate:
            self._validate(forward, run, captured)
        return run

    def _masked_logits(self, forward, kwargs, length: int):
        """The logits of the masked prompt ``x~`` (`masked_prompt`), or the out-of-memory detail (a str)."""
        try:
            return forward(**masked_prompt(kwargs)).logits
        except torch.OutOfMemoryError as error:
            return self._out_of_memory(error, length, 'the validation forward on the masked prompt')

    def _validate(self, forward, run: ForwardRun, captured: CapturedForward) -> None:
        """``D_{i,t}`` (Eq. 12) of every output of ``run`` from the captured forward's logits at the rows ``s_{i,t}``
        and those of one more forward on the masked prompt; the full-vocabulary logits are dropped afterwards."""
        outputs = captured.model_outputs
        logits = outputs.logits
        # the run keeps its model outputs (the debug report) without the full-vocabulary logits
        run.model_outputs = type(outputs)(**{k: v for k, v in outputs.items() if k != 'logits'})
        masked = self._masked_logits(forward, captured.kwargs, captured.length)
        if isinstance(masked, str):
            run.dependencies, run.validation_detail = [None] * len(run.unit), masked
            return
        first = captured.logits_from

        def dependency(rows: range) -> torch.Tensor:
            # in chunks of rows: the float32 log-probabilities of a chunk are its only full-vocabulary temporaries
            parts = [token_visual_dependency(logits[0, a - first:min(a + VALIDATION_ROWS, rows.stop) - first],
                                             masked[0, a - first:min(a + VALIDATION_ROWS, rows.stop) - first])
                     for a in range(rows.start, rows.stop, VALIDATION_ROWS)]
            return torch.cat(parts).cpu() if parts else torch.zeros(0)

        # a trajectory's D over its span, then its rows
        run.dependencies = [(dependency(c.rows) if c.selected is None else dependency(c.rows)[c.selected])
                            if run.complete else None for c in captured.capture.captures]
        if not run.complete:
            run.validation_detail = 'the reward forward did not capture L_att'

    def incomplete_message(self, run: ForwardRun) -> str:
        """The error of a forward whose attention layers did not all run through the DDAPO attention function."""
        seen = sorted(set(run.capture.layers_seen))
        return (f'ddapo_attention captured {len(set(seen) & set(self.attention_layers))} of '
                f'{len(self.attention_layers)} attention layers (decoder layers {seen} ran through it, L_att is '
                f'{list(self.attention_layers)}): the model did not run the attention of every layer of L_att '
                f'through the {self.implementation!r} attention function. '
                'This model is not supported; see the [DDAPO_DEBUG] lines above.')
