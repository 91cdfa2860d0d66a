"""``DDAPOAttentionORM``: the DDAPO attention-balance reward ``R^bal`` (Eq. 7) for ms-swift GRPO.

One reward call, file by file:

    reward kwargs --ms_swift.adapter.SwiftTrainer.rows--> one row per completion (position i)
    DDAPO_FORWARD=old_logps (the default wherever it is exact, ms_swift.old_logps.forward_path): the rows were
          encoded and their attention captured inside ms-swift's old log-prob forward, which ran just before this
          call (swift_patches/grpo_old_logps_scoring.py); each row takes its `Captured` by request_id: an `Output`
          and a `ForwardRun` with no forward of its own. Other rows, and every row on validation steps, go on:
    row i --SwiftTrainer.encode--> [q ; o_i] with the trainer's template, exact generated ids, P
          --ddapo.core.key_sets.build_key_sets--> T (text_keys), V (vision_keys): an `Output`
    Outputs --ddapo.engine.scheduler.ForwardScheduler--> one forward per prompt (DDAPO_ATTENTION=shared,
                                                  ddapo.core.packing)
                                                  or per output, padded to the busiest rank where forwards are
                                                  collective (ZeRO-3); ddapo.engine.capture: the Eq. (1) sums of every
                                                  attention layer of L_att, per output
    sums --ddapo.core.scorer.score_output--> m^T_{i,t} over Lambda (DDAPO_LAYERS), rho_text, rho_vis, TDR_i,
                                        R^bal_i = 1 / (1 + TDR_i); with DDAPO_TOKEN_WEIGHTS=1 also w_{i,t} (Eq. 11),
                                        handed to the trainer by request_id (SwiftTrainer.hand_over_token_weights)
    every output's SharedOutput, and the rank's own forwards --SwiftTrainer.gather (one per call)--> all ranks'
          outputs, ddapo/own_forwards
          --ddapo.core.scorer.group_variant--> R^grp (Eq. 8) / R^gate (Eq. 9) with DDAPO_REWARD=group / gated
          --ddapo.step_log.StepLogger--> the step's ddapo/* metrics; on logging steps the report under
                                         <output_dir>/ddapo/ (no extra forward)
    validation steps (DDAPO_VALIDATE_STEPS=N, every N-th step): the scheduler also runs each unit on the masked
          prompt (ddapo.core.validity.masked_prompt) and gives every output D_{i,t} (Eq. 12); each output's
          OutputValidity (R^bal_i, D_i, Eq. 13) joins the one gather; the step log adds ddapo/validity/* (Eq. 14) and
          the report's scatter and m^V-D plots. The rewards are computed exactly as on other steps.
    --> List[Optional[float]], by position

Needs the trainer in the reward kwargs (``trainer``), which the ms-swift patch in ``swift_patches/`` provides
(for token weights, the second patch there; for reading the old log-prob forward, the third); ``plugin.py`` applies
them.
"""
from collections import Counter
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import torch
from swift.rewards import ORM
from swift.utils import get_logger

from ddapo.core.config import DDAPOConfig
from ddapo.core.formulas import layer_set
from ddapo.core.row import Row
from ddapo.engine.scheduler import ForwardCall, ForwardRun, ForwardScheduler, Output
from ddapo.core.scorer import (RankShare, RowKeys, Scored, SharedOutput, WeightSettings, group_variant,
                               score_output, token_weight_block)
from ddapo.core.validity import OutputValidity, output_validity
from ddapo.step_log import StepLogger, debug_lines, layers_note
from ddapo.ms_swift.encoding import EncodingFailed, NotEncodable
from ddapo.ms_swift.adapter import SwiftTrainer
from ddapo.ms_swift.trainer_io import registered_reward

logger = get_logger()

MISSING_TRAINER = (
    "ddapo_attention needs the GRPO trainer in the reward kwargs ('trainer'), and it is missing: the ms-swift "
    'patch is not applied. Load the reward through --external_plugins examples/train/grpo/plugin/plugin.py '
    '(it applies swift_patches/grpo_reward_kwargs.py), or apply swift_patches/ms_swift_4.6_grpo_reward_kwargs.diff '
    'to ms-swift.')


# Why a validity statistic is undefined (Eq. 14), for the once-per-reason warning.
UNDEFINED = {
    'fewer_than_3': 'a rank correlation needs at least 3 values',
    'constant': 'one side holds a single value (every output or token the same)',
    'no_outputs': 'no output of the step has both R^bal and D',
    'reward_not_applicable': 'its R^bal is undefined (see not_applicable)',
    'out_of_memory': 'the validation forward on the masked prompt ran out of memory',
}


def output_validity_of(scored: Scored, dependency) -> OutputValidity:
    """An output's part of Eq. (12)-(14) on a validation step: its ``R^bal_i`` (Eq. 7, whatever ``DDAPO_REWARD``),
    ``m^V_{i,t} = 1 - m^T_{i,t}`` and ``D_{i,t}``; left out without a defined ``R^bal_i`` or without ``D_{i,t}``."""
    if scored.diagnostics.scores is None:  # no R^bal_i (notation section 4)
        return OutputValidity.left_out('reward_not_applicable')
    if dependency is None:
        return OutputValidity.left_out('out_of_memory')
    return output_validity(scored.diagnostics.scores.reward_balance, 1.0 - scored.m_text, dependency)


class DDAPOAttentionORM(ORM):
    """``R^bal_i = 1 / (1 + TDR_i)`` of Eq. (7) for every completion (``DDAPO_REWARD=balance``, the default),
    or the group-robust ``R^grp`` of Eq. (8) (``group``) or the correctness-gated ``R^gate`` of Eq. (9) (``gated``);
    ``None`` where it is undefined.

    ``config``: the settings; ``None`` reads them from the ``DDAPO_*`` environment variables (`DDAPOConfig.from_env`),
    the way in from ``swift rlhf``. ``None`` rewards (notation section 4: text-only prompt, empty completion, ...)
    are counted per reason in ``not_applicable`` and in ``ddapo/not_applicable_frac``, and warned once per reason;
    never replaced by a constant.
    """

    def __init__(self, args=None, config: Optional[DDAPOConfig] = None, **kwargs):
        super().__init__(args, **kwargs)
        self.config = DDAPOConfig.from_env() if config is None else config
        logger.info(f'[DDAPO] ddapo_attention reward settings: {self.config.describe()}')
        self.gate = registered_reward(self.config.gate_reward, args) if self.config.reward == 'gated' else None
        self.swift: Optional[SwiftTrainer] = None
        self.scheduler: Optional[ForwardScheduler] = None
        self.step_log = StepLogger(self.config)
        self.not_applicable: Counter = Counter()
        self.unweighted: Counter = Counter()  # outputs with a reward but no token weights, by reason
        self.validity_undefined: Counter = Counter()  # validation steps: 'statistic/reason' -> steps or outputs
        self.uncaptured = 0  # rows the old log-prob forward did not capture (scored with a forward of its own)
        self.diagnostics_failed: Counter = Counter()  # report, pictures, trackers: failures over the run, by kind
        self._warned: set = set()
        self._stop: Optional[str] = None
        self._step_failures: Counter = Counter()
        # this rank's outputs of the last call on a validation step, by position: Eq. (12)-(14), D_{i,t}
        self.last_validity: Dict[int, OutputValidity] = {}
        self.last_dependencies: Dict[int, torch.Tensor] = {}
        self._debug_pending = self.config.debug

    @property
    def last_metrics(self) -> Dict[str, float]:
        return self.step_log.last_metrics

    def on_trainer_init(self, trainer) -> None:
        """Called by the patched trainer once its rewards exist: validate the policy model (and, with
        DDAPO_TOKEN_WEIGHTS=1, that the trainer can take token weights) at start."""
        self.swift = SwiftTrainer(trainer)
        spec = self.swift.spec
        self.scheduler = ForwardScheduler(self.config, spec.attention_layers, spec.hybrid)
        if self.config.token_weights:
            self.swift.enable_token_weights()
        path = self.swift.choose_forward(self.config)
        logger.info(f'[DDAPO] policy model {spec.model_type}: {spec.num_layers} decoder layers, {layers_note(spec)}; '
                    f'vision token ids {sorted(spec.vision_token_ids)}')
        logger.info(f'[DDAPO] completions from: {self.swift.rollout}')
        logger.info(f'[DDAPO] attention read: {path.describe()}')

    def __call__(self, completions: List[str], **kwargs) -> List[Optional[float]]:
        trainer = kwargs.get('trainer')
        if trainer is None:
            raise RuntimeError(MISSING_TRAINER)  # the same on every rank, before any collective
        if self.swift is None or self.swift.trainer is not trainer:
            self.on_trainer_init(trainer)
        swift, scheduler = self.swift, self.scheduler
        # Why this call must stop (DDAPO_STRICT, a missing request_id, an incomplete capture, ...): never raised where
        # it is met, since the other ranks would wait in the call's collectives; every rank still runs its forwards and
        # joins the one gather, which carries it, and then every rank raises (`_share`).
        self._stop: Optional[str] = None
        self._step_failures: Counter = Counter()  # diagnostics that failed in this call, by kind
        rows = swift.rows(kwargs, len(completions))
        layers = layer_set(len(swift.spec.attention_layers), self.config.layers)  # positions in L_att
        results: List[Optional[Scored]] = [None] * len(rows)
        validate = self.config.validating(swift.step)
        captured: Dict[int, ForwardRun] = {}
        outputs: List[Output] = []
        titles: Dict[int, str] = {}
        with self._stopping('reading the old log-prob forward'):
            # rows the old log-prob forward captured (never on validation steps), by position; the others get forwards
            captured = self._captured(rows, swift.captured(), results, validate)
        # ms-swift side: rows encoded with their key sets; engine: every forward of the call, in the forward context
        with swift.policy_forward(scheduler.implementation) as (env, report):
            with self._stopping('encoding the rows'):
                outputs = [output for output in (self._output(position, row, results)
                                                 for position, row in enumerate(rows)
                                                 if position not in captured and results[position] is None)
                           if output is not None]
                shown = sorted([run.unit[0] for run in captured.values()] + outputs, key=lambda o: o.position)
                titles = self.step_log.choose(shown, swift.is_main_process, swift.step, swift.logging_steps, validate)
            # every rank runs this, whatever happened above: under ZeRO-3 its forward count is agreed in a collective.
            # A failure inside a forward stops the call too (where a forward is itself a collective, ZeRO-3, the
            # other ranks are inside it: no reward can repair that, docs/scale.md)
            call = ForwardCall([])
            with self._stopping('the reward forwards'):
                call = scheduler.run(outputs, env, report=titles, validate=validate)
        self._note_padding(call.padding, scheduler.last_forwards)
        runs = [captured[p] for p in sorted(captured)] + call.runs
        samples: Dict[int, Any] = {}  # the report's outputs, by position
        validity, dependencies = {}, {}  # on validation steps: Eq. (12)-(14) and D_{i,t} per output, by position
        with self._stopping('scoring the outputs'):
            incomplete = next((run for run in runs if not run.out_of_memory and not run.complete), None)
            if incomplete is not None:
                self._debug(incomplete.report or report, incomplete, layers, None)
                self._stop_call(scheduler.incomplete_message(incomplete))
            else:
                self._score_runs(runs, layers, report, titles, validate, results, samples, validity, dependencies)
            if validate:  # outputs that never reached a forward (not encodable)
                validity.update({p: OutputValidity.left_out('reward_not_applicable')
                                 for p in range(len(rows)) if p not in validity})
            self.last_validity, self.last_dependencies = validity, dependencies
            # ms-swift side: token weights, the one gather, the step's metrics and report
            if self.config.token_weights and self._stop is None:
                swift.hand_over_token_weights(rows, [r.token_weights for r in results])
        return self._share(completions, kwargs, rows, results, swift.mode, [samples[p] for p in sorted(samples)],
                           validity if validate else None, scheduler.last_forwards + scheduler.last_padding)

    def _score_runs(self, runs: List[ForwardRun], layers: List[int], report, titles: Dict[int, str], validate: bool,
                    results: List[Optional[Scored]], samples: Dict[int, Any], validity: Dict[int, OutputValidity],
                    dependencies: Dict[int, torch.Tensor]) -> None:
        """Each output's reward from its captured sums (core), and what the report and validity take of it."""
        swift = self.swift
        for run in runs:
            for k, output in enumerate(run.unit):
                scored = results[output.position] = self._score(output, run, k, layers, run.report or report)
                dependency = run.dependencies[k] if run.dependencies is not None else None
                if validate:
                    validity[output.position] = output_validity_of(scored, dependency)
                    if dependency is not None:
                        dependencies[output.position] = dependency
                    elif run.validation_detail and 'validation_forward' not in self._warned:
                        self._warned.add('validation_forward')
                        logger.warning(f'[DDAPO] DDAPO_VALIDATE_STEPS: an output has no D_{{i,t}}: '
                                       f'{run.validation_detail}. Left out of the validity statistics (counted in '
                                       'ddapo/validity/left_out/*); warned once.')
                if output.position in titles and scored.reward is not None:
                    try:  # a diagnostic: its failure is counted, never the step's
                        samples[output.position] = self.step_log.report_sample(
                            output, run.captures[k], layers, scored, titles[output.position],
                            swift.sample_view(output.row, output.generated, output.encoded.forward_kwargs),
                            swift.spec.image_token_id, dependency)
                    except Exception as error:
                        self._diagnostic_failed('report_sample', error)

    @contextmanager
    def _stopping(self, stage: str) -> Iterator[None]:
        """Run ``stage``; an exception in it becomes the reason this call stops (raised on every rank after the
        gather), not an exception on this rank alone."""
        try:
            yield
        except Exception as error:
            self._stop_call(f'{stage}: {type(error).__name__}: {error}')

    def _stop_call(self, reason: str) -> None:
        if self._stop is None:
            self._stop = reason

    def _diagnostic_failed(self, kind: str, error: Exception) -> None:
        """A report, picture or tracker failure: warned once per kind, counted in ddapo/diagnostics_failed/<kind>; the
        rewards and the run go on."""
        if kind not in self.diagnostics_failed:
            logger.warning(f'[DDAPO] the {kind.replace("_", " ")} failed ({type(error).__name__}: {error}); the rewards '
                           f'are unaffected. Counted in ddapo/diagnostics_failed/{kind}; warned once.')
        self.diagnostics_failed[kind] += 1
        self._step_failures[kind] += 1

    def _captured(self, rows: List[Row], captured: Dict[str, Any], results: List[Optional[Scored]],
                  validate: bool) -> Dict[int, ForwardRun]:
        """The rows whose attention the old log-prob forward captured, as a `ForwardRun` each, by position; a row it
        could not encode gets its None here. Rows it did not see (or every row, on a validation step) are left to the
        reward's own forwards; outside validation steps that is counted and warned once."""
        if self.swift.capture is None:
            return {}
        runs = {}
        for position, row in enumerate(rows):
            found = None if validate else captured.get(row.request_id)
            if isinstance(found, NotEncodable):
                results[position] = self._not_applicable(Scored.not_applicable(found.reason, str(found)))
            elif found is not None:
                output = Output(position, row, found.encoded, found.key_sets)
                runs[position] = ForwardRun([output], None if found.capture is None else [found.capture],
                                            found.forward, length=found.length, report=found.report)
            elif not validate:
                if not self.uncaptured:
                    logger.warning('[DDAPO] a row the old log-prob forward did not capture (request_id '
                                   f'{row.request_id!r}) is scored with a forward of its own; counted in '
                                   'ddapo/own_forwards; warned once.')
                self.uncaptured += 1
        return runs

    def _output(self, position: int, row: Row, results: List[Optional[Scored]]) -> Optional[Output]:
        """Row ``position`` encoded with its key sets; ``None`` (its result set to not applicable) when it cannot be."""
        spec = self.swift.spec
        try:
            encoded = self.swift.encode(row)
        except NotEncodable as error:
            results[position] = self._not_applicable(Scored.not_applicable(error.reason, str(error)))
            return None
        except Exception as error:  # an image file that cannot be read, ...: this row only
            failed = EncodingFailed(f'the row could not be encoded ({type(error).__name__}: {error})')
            results[position] = self._not_applicable(Scored.not_applicable(failed.reason, str(failed)))
            return None
        return Output(position, row, encoded, encoded.key_sets(spec.vision_token_ids, spec.special_ids))

    def _score(self, output: Output, run: ForwardRun, k: int, layers: List[int], report) -> Scored:
        """`score_output` of the ``k``-th output of ``run``; counts what is not applicable or left unweighted."""
        if run.out_of_memory:
            return self._not_applicable(Scored.not_applicable('out_of_memory', run.detail))
        config, key_sets = self.config, output.key_sets
        weights = (WeightSettings(config.token_weight_clip, config.token_weight_sigma) if config.token_weights
                   else None)
        rows = output.encoded.rows  # a multi-turn trajectory's (notation section 6)
        trajectory = None if rows is None else RowKeys.of(key_sets, rows, run.captures[k].env_masses)
        scored = score_output(run.captures[k].masses, layers, key_sets.num_text_keys, key_sets.num_vision_keys,
                              output.generated, self.swift.spec.special_ids, weights,
                              token_weight_block(output.encoded.labelled), trajectory)
        self._debug(report, run, layers, scored)
        if scored.reward is None:
            return self._not_applicable(scored)
        if scored.unweighted is not None:
            reason, detail = scored.unweighted.reason, scored.unweighted.detail
            if reason not in self.unweighted:
                logger.warning(f'[DDAPO] token weights left out (advantage weight 1) for an output that {detail}: '
                               f'the weights could not be matched to its completion tokens ({reason}). Counted in '
                               'unweighted; warned once per reason.')
            self.unweighted[reason] += 1
        return scored

    def _not_applicable(self, scored: Scored) -> Scored:
        reason = scored.diagnostics.reason
        if self.config.strict:  # stops the call on every rank, after the gather
            self._stop_call(f'DDAPO_STRICT=1: the ddapo_attention reward is not applicable ({reason}): '
                            f'{scored.detail}')
        if reason not in self.not_applicable:
            logger.warning(f'[DDAPO] reward is None ({reason}): {scored.detail}. Counted in not_applicable and '
                           'ddapo/not_applicable_frac; warned once per reason.')
        self.not_applicable[reason] += 1
        return scored

    def _share(self, completions: List[str], kwargs: Dict[str, Any], rows: List[Row], results: List[Scored],
               mode: str, samples, validity: Optional[Dict[int, OutputValidity]] = None,
               own_forwards: int = 0) -> List[Optional[float]]:
        """The one gather of the call (every rank's outputs, for the metrics, Eq. 8 / 9 and on validation steps
        Eq. 14, and the forwards each rank ran itself), then the step's log."""
        grouped = self.config.reward != 'balance'
        if grouped and any(row.prompt_id is None for row in rows):
            self._stop_call(f'DDAPO_REWARD={self.config.reward} groups outputs by prompt_id, and the reward kwargs have '
                            'rows without one; run it under ms-swift GRPO, which sets prompt_id on every row.')
        verdicts = [1.0] * len(rows)
        if self.gate is not None and self._stop is None:
            with self._stopping(f'the gate reward DDAPO_GATE_REWARD={self.config.gate_reward}'):
                verdicts = list(self.gate(completions, **kwargs))
                if len(verdicts) != len(rows):
                    raise ValueError(f'it returned {len(verdicts)} values for {len(rows)} completions')
        rank = self.swift.rank
        mine = [] if self._stop is not None else [
            SharedOutput(rank, i, r.diagnostics, row.prompt_id, v is not None and v >= 1.0,
                         None if validity is None else validity[i])
            for i, (row, r, v) in enumerate(zip(rows, results, verdicts))]
        ranks = self.swift.gather([RankShare(own_forwards, mine, rank, self._stop)])
        stops = [f'rank {share.rank}: {share.stop}' for share in ranks if share.stop is not None]
        if stops:  # every rank has now joined the gather: all of them stop, with the same message
            raise RuntimeError('ddapo_attention stopped the run on every rank: ' + '; '.join(stops))
        shared = [output for share in ranks for output in share.outputs]
        swift = self.swift
        record = self.step_log.log(mode, [s.diagnostics for s in shared], samples, swift.step, swift.output_dir,
                                   swift.rollout, swift.spec,
                                   None if validity is None else [s.validity for s in shared], swift.path.describe())
        record.metrics['ddapo/own_forwards'] = float(sum(share.own_forwards for share in ranks))
        for statistic, reasons in record.undefined.items():
            for reason in reasons:
                self._warn_validity(statistic, reason, UNDEFINED.get(reason, reason))
        if record.failure is not None:
            self._diagnostic_failed('report', record.failure)
        if record.pictures:  # the report's pictures in TensorBoard / wandb / swanlab
            try:
                swift.log_pictures(swift.step + 1, record.pictures)
            except Exception as error:
                self._diagnostic_failed('trackers', error)
        record.metrics.update({f'ddapo/diagnostics_failed/{kind}': float(n) for kind, n in self._step_failures.items()})
        swift.log_metrics(mode, record.metrics)
        if not grouped:
            return [r.reward for r in results]
        return group_variant(shared, rank, len(rows), self.config.sigma, gated=self.gate is not None)

    def _warn_validity(self, statistic: str, reason: str, detail: str) -> None:
        """Warn once per undefined validity statistic and reason (the step's metrics count them)."""
        key = f'{statistic}/{reason}'
        if key not in self.validity_undefined:
            what = ('an output left out of the validity statistics' if statistic == 'left_out' else
                    f'ddapo/validity/{statistic} undefined')
            logger.warning(f'[DDAPO] DDAPO_VALIDATE_STEPS: {what} ({reason}): {detail}. Counted in '
                           f'ddapo/validity/{"" if statistic == "left_out" else "undefined/"}{key}; warned once.')
        self.validity_undefined[key] += 1

    def _note_padding(self, padding: int, forwards: int) -> None:
        if padding and self.scheduler.padding_forwards == padding:  # this rank's first padding forwards of the run
            logger.info(f'[DDAPO] rank {self.swift.rank} runs {padding} padding forward(s) after its {forwards}, as '
                        'many as the busiest rank (ZeRO-3 gathers parameters in every forward); logged once per run')

    def _debug(self, report, run: ForwardRun, layers: List[int], scored: Optional[Scored]) -> None:
        """Seed 001's one-time report, on the first output of the run (and before the error of an incomplete one)."""
        if self._debug_pending or (not run.out_of_memory and not run.complete):
            self._debug_pending = False
            for line in debug_lines(self.config, self.swift.spec, self.scheduler.implementation, report, run, layers,
                                    scored):
                logger.info(f'[DDAPO_DEBUG] {line}')
