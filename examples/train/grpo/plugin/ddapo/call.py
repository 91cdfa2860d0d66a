"""One call of the ``ddapo_attention`` reward: `RewardCall`, built per call by ``DDAPOAttentionORM.__call__``, holds what
lives for that call only (its rows, results, report samples, why it must stop) and runs its stages in order:

    read    rows the old log-prob forward captured (``DDAPO_FORWARD=old_logps``): an Output and a ForwardRun each
    encode  the others (all rows under own, every row on validation steps): [q ; o_i] with the trainer's template
    run     their forwards, in the forward context (ddapo.engine.scheduler)
    score   each output's R^bal from its captured sums (ddapo.core.scorer); one bad output is one counted None
    check   on the first call of each path (DDAPO_SELF_CHECK): a few outputs per rank again with eager, compared
            (ddapo.self_check_stage, ddapo.core.self_check); a path that disagrees is left, on every rank, and the
            call's rewards are eager's
    share   token weights to the trainer, the one gather of every rank's outputs, Eq. (8) / (9), metrics and report

What lives across calls (settings, counters, the trainer side, the scheduler, which paths were checked) stays on the
reward class (``ddapo.reward``), which a call reaches as ``self.orm``.
"""
from collections import Counter
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Union

import torch
from swift.utils import get_logger

from ddapo.core.formulas import layer_set
from ddapo.core.row import Row
from ddapo.core.scorer import RankShare, RowKeys, Scored, SharedOutput, WeightSettings, group_variant, score_output, \
    token_weight_block
from ddapo.core.validity import OutputValidity, output_validity
from ddapo.engine.scheduler import ForwardCall, ForwardRun, Output
from ddapo.ms_swift.encoding import EncodingFailed, NotEncodable
from ddapo.ms_swift.old_logps import OLD_LOGPS
from ddapo.self_check_stage import self_check

logger = get_logger()


def output_validity_of(scored: Scored, dependency) -> OutputValidity:
    """An output's part of Eq. (12)-(14) on a validation step: its ``R^bal_i`` (Eq. 7, whatever ``DDAPO_REWARD``),
    ``m^V_{i,t} = 1 - m^T_{i,t}`` and ``D_{i,t}``; left out without a defined ``R^bal_i`` or without ``D_{i,t}``."""
    if scored.diagnostics.scores is None:  # no R^bal_i (notation section 4)
        return OutputValidity.left_out('reward_not_applicable')
    if dependency is None:
        return OutputValidity.left_out('out_of_memory')
    return output_validity(scored.diagnostics.scores.reward_balance, 1.0 - scored.m_text, dependency)


class RewardCall:
    """One reward call's state and stages (module docstring). ``run()`` returns the rewards, by position."""

    def __init__(self, orm, completions: List[str], kwargs: Dict[str, Any]):
        self.orm, self.completions, self.kwargs = orm, completions, kwargs
        self.swift, self.scheduler, self.config = orm.swift, orm.scheduler, orm.config
        # Why this call must stop (DDAPO_STRICT, a missing request_id, an incomplete capture, ...): never raised where
        # it is met, since the other ranks would wait in the call's collectives; every rank still runs its forwards and
        # joins the one gather, which carries it, and then every rank raises (`share`).
        self.stop: Optional[str] = None
        self.failures: Counter = Counter()  # diagnostics that failed in this call, by kind
        self.rows: List[Row] = self.swift.rows(kwargs, len(completions))
        self.layers = layer_set(len(self.swift.spec.attention_layers), self.config.layers)  # positions in L_att
        self.results: List[Optional[Scored]] = [None] * len(self.rows)
        self.mode = self.swift.mode  # train or eval: read now, the reward's own forwards run in eval mode
        self.validate = orm.validating(self.swift.step, self.mode)
        # the path this call reads: the old log-prob forward's captures, or the reward's own forwards (their fallback
        # rows under old_logps are own forwards too, but the call's path is what its self-check compares)
        self.path = OLD_LOGPS if self.swift.path.name == OLD_LOGPS and not self.validate else \
            f'own/{self.scheduler.attention}'
        self.samples: Dict[int, Any] = {}  # the report's outputs, by position
        self.validity: Dict[int, OutputValidity] = {}  # on validation steps: Eq. (12)-(14) per output, by position
        self.dependencies: Dict[int, torch.Tensor] = {}  # on validation steps: D_{i,t} per output, by position
        self.metrics: Dict[str, float] = {}  # the call's own ddapo/* metrics besides the step log's
        self.own_forwards = 0

    @contextmanager
    def stopping(self, stage: str) -> Iterator[None]:
        """Run ``stage``; an exception in it becomes the reason this call stops (raised on every rank after the
        gather), not an exception on this rank alone."""
        try:
            yield
        except Exception as error:
            self.stop_call(f'{stage}: {type(error).__name__}: {error}')

    def stop_call(self, reason: str) -> None:
        if self.stop is None:
            self.stop = reason

    def run(self) -> List[Optional[float]]:
        swift, scheduler = self.swift, self.scheduler
        captured: Dict[int, ForwardRun] = {}
        with self.stopping('reading the old log-prob forward'):
            captured = self.read_captured(swift.captured())
        # ms-swift side: rows encoded with their key sets; engine: every forward of the call, in the forward context
        outputs: List[Output] = []
        titles: Dict[int, str] = {}
        with swift.policy_forward(scheduler.implementation) as (env, report):
            with self.stopping('encoding the rows'):
                for position, row in enumerate(self.rows):
                    if position not in captured and self.results[position] is None:
                        encoded = self.encode(position, row)
                        if isinstance(encoded, Output):
                            outputs.append(encoded)
                        else:
                            self.results[position] = self.orm.count(encoded, self)
                shown = sorted([run.unit[0] for run in captured.values()] + outputs, key=lambda o: o.position)
                titles = self.orm.step_log.choose(shown, swift.is_main_process, swift.step, swift.logging_steps,
                                                  self.validate, self.mode)
            # every rank runs this, whatever happened above: under ZeRO-3 its forward count is agreed in a collective
            call = ForwardCall([])
            with self.stopping('the reward forwards'):
                call = scheduler.run(outputs, env, report=titles, validate=self.validate)
        self.orm.note_padding(call.padding, scheduler.last_forwards)
        self.own_forwards = scheduler.last_forwards + scheduler.last_padding
        runs = [captured[p] for p in sorted(captured)] + call.runs
        with self.stopping('scoring the outputs'):
            incomplete = next((run for run in runs if not run.out_of_memory and not run.failure and not run.complete),
                              None)
            if incomplete is not None:
                self.orm.debug(incomplete.report or report, incomplete, self.layers, None)
                self.stop_call(scheduler.incomplete_message(incomplete))
            else:
                self.score_runs(runs, report, titles)
        self_check(self, sorted(captured), sorted(o.position for run in call.runs for o in run.unit), runs, titles)
        with self.stopping('scoring the outputs'):
            if self.validate:  # outputs that never reached a forward (not encodable)
                self.validity.update({p: OutputValidity.left_out('reward_not_applicable')
                                      for p in range(len(self.rows)) if p not in self.validity})
            self.orm.last_validity, self.orm.last_dependencies = self.validity, self.dependencies
            # ms-swift side: token weights, the one gather, the step's metrics and report
            if self.config.token_weights and self.stop is None:
                swift.hand_over_token_weights(self.rows, self.token_weights())
        return self.share()

    def token_weights(self) -> List[Optional[List[float]]]:
        """Each output's ``w_{i,t}`` for the trainer, which takes them by ``request_id``; outputs that share their
        ``request_id`` with another (the splits of one trajectory under a server scheduler) keep weight 1, counted in
        ``unweighted`` (the trainer could not tell their weights apart)."""
        ids = Counter(row.request_id for row in self.rows)
        weights = []
        for row, result in zip(self.rows, self.results):
            own = None if result is None else result.token_weights
            if own is not None and ids[row.request_id] > 1:
                self.orm.warn_once('unweighted/shared_request_id', 'token weights left out (advantage weight 1) for '
                                   'outputs that share a request_id (the splits of one trajectory): the trainer '
                                   'takes weights by request_id. Counted in unweighted')
                self.orm.unweighted['shared_request_id'] += 1
                own = None
            weights.append(own)
        return weights

    # read, encode
    def read_captured(self, captured: Dict[str, Any]) -> Dict[int, ForwardRun]:
        """The rows whose attention the old log-prob forward captured, as a `ForwardRun` each, by position; a row it
        could not encode gets its None here. Rows it did not see (or every row, on a validation step) are left to the
        reward's own forwards; outside validation steps that is counted and warned once."""
        if self.swift.capture is None:
            return {}
        runs = {}
        for position, row in enumerate(self.rows):
            found = None if self.validate else captured.get(row.request_id)
            if isinstance(found, NotEncodable):
                self.results[position] = self.orm.count(Scored.not_applicable(found.reason, str(found)), self)
            elif found is not None:
                output = Output(position, row, found.encoded, found.key_sets)
                runs[position] = ForwardRun([output], None if found.capture is None else [found.capture],
                                            found.forward, length=found.length, report=found.report)
            elif not self.validate:
                if not self.orm.uncaptured:
                    logger.warning('[DDAPO] a row the old log-prob forward did not capture (request_id '
                                   f'{row.request_id!r}) is scored with a forward of its own; counted in '
                                   'ddapo/own_forwards; warned once.')
                self.orm.uncaptured += 1
        return runs

    def encode(self, position: int, row: Row) -> Union[Output, Scored]:
        """Row ``position`` encoded with its key sets, or its not-applicable result when it cannot be."""
        spec = self.swift.spec
        try:
            encoded = self.swift.encode(row)
        except Exception as error:  # not encodable, an image file that cannot be read, ...: this row only
            failed = error if isinstance(error, NotEncodable) else EncodingFailed(
                f'the row could not be encoded ({type(error).__name__}: {error})')
            return Scored.not_applicable(failed.reason, str(failed))
        return Output(position, row, encoded, encoded.key_sets(spec.vision_token_ids, spec.special_ids))

    # score
    def score_runs(self, runs: List[ForwardRun], report, titles: Dict[int, str], count: bool = True) -> None:
        """Each output's reward from its captured sums (core), and what the report and validity take of it; an output
        whose scoring raises is one counted None (``scoring_failed``), never the call's end."""
        swift = self.swift
        for run in runs:
            for k, output in enumerate(run.unit):
                try:
                    scored = self.score(output, run, k, run.report or report, count)
                except Exception as error:
                    scored = Scored.not_applicable('scoring_failed', f'scoring it raised {type(error).__name__}: '
                                                                     f'{error}')
                    scored = self.orm.count(scored, self) if count else scored
                self.results[output.position] = scored
                dependency = run.dependencies[k] if run.dependencies is not None else None
                if self.validate:
                    self.validity[output.position] = output_validity_of(scored, dependency)
                    if dependency is not None:
                        self.dependencies[output.position] = dependency
                    elif run.validation_detail:
                        self.orm.warn_once('validation_forward', f'DDAPO_VALIDATE_STEPS: an output has no D_{{i,t}}: '
                                           f'{run.validation_detail}. Left out of the validity statistics (counted in '
                                           'ddapo/validity/left_out/*)')
                if output.position in titles and scored.reward is not None:
                    try:  # a diagnostic: its failure is counted, never the step's
                        self.samples[output.position] = self.orm.step_log.report_sample(
                            output, run.captures[k], self.layers, scored, titles[output.position],
                            swift.sample_view(output.row, output.generated, output.encoded.forward_kwargs),
                            swift.spec.image_token_id, dependency)
                    except Exception as error:
                        self.orm.diagnostic_failed('report_sample', error, self)

    def score(self, output: Output, run: ForwardRun, k: int, report, count: bool = True) -> Scored:
        """`score_output` of the ``k``-th output of ``run``; counts what is not applicable or left unweighted."""
        if run.out_of_memory or run.failure:
            reason = 'out_of_memory' if run.out_of_memory else 'reward_forward_failed'
            scored = Scored.not_applicable(reason, run.detail or f'its forward unit failed ({run.failure})')
            return self.orm.count(scored, self) if count else scored
        config, key_sets = self.config, output.key_sets
        weights = (WeightSettings(config.token_weight_clip, config.token_weight_sigma) if config.token_weights
                   else None)
        rows = output.encoded.rows  # a multi-turn trajectory's (notation section 6)
        trajectory = None if rows is None else RowKeys.of(key_sets, rows, run.captures[k].env_masses)
        scored = score_output(run.captures[k].masses, self.layers, key_sets.num_text_keys, key_sets.num_vision_keys,
                              output.generated, self.swift.spec.special_ids, weights,
                              token_weight_block(output.encoded.labelled), trajectory,
                              entropies=run.captures[k].entropies)  # seed 003's diagnostics (Eq. 15-17)
        if count:
            self.orm.debug(report, run, self.layers, scored)
            if scored.diagnostic_failure is not None:
                self.orm.diagnostic_failed('attention_entropy', scored.diagnostic_failure, self)
        if scored.reward is None:
            return self.orm.count(scored, self) if count else scored
        if scored.unweighted is not None and count:
            reason = scored.unweighted.reason
            self.orm.warn_once(f'unweighted/{reason}', f'token weights left out (advantage weight 1) for an output '
                               f'that {scored.unweighted.detail}: the weights could not be matched to its completion '
                               f'tokens ({reason}). Counted in unweighted')
            self.orm.unweighted[reason] += 1
        return scored

    # check
    # share
    def share(self) -> List[Optional[float]]:
        """The one gather of the call (every rank's outputs, for the metrics, Eq. 8 / 9 and on validation steps
        Eq. 14, and the forwards each rank ran itself), then the step's log."""
        orm, swift, rows, results = self.orm, self.swift, self.rows, self.results
        results = [r if r is not None else Scored.not_applicable('not_scored', 'the call stopped before it was scored')
                   for r in results]
        grouped = self.config.reward != 'balance'
        if grouped and any(row.prompt_id is None for row in rows):
            self.stop_call(f'DDAPO_REWARD={self.config.reward} groups outputs by prompt_id, and the reward kwargs have '
                           'rows without one; run it under ms-swift GRPO, which sets prompt_id on every row.')
        verdicts = [1.0] * len(rows)
        if orm.gate is not None:  # on every rank, stopping or not: the gate reward may itself be collective
            with self.stopping(f'the gate reward DDAPO_GATE_REWARD={self.config.gate_reward}'):
                verdicts = list(orm.gate(self.completions, **self.kwargs))
                if len(verdicts) != len(rows):
                    raise ValueError(f'it returned {len(verdicts)} values for {len(rows)} completions')
        rank = swift.rank
        validity = self.validity if self.validate else None
        mine = [] if self.stop is not None else [
            SharedOutput(rank, i, r.diagnostics, row.prompt_id, v is not None and v >= 1.0,
                         None if validity is None else validity[i])
            for i, (row, r, v) in enumerate(zip(rows, results, verdicts))]
        ranks = swift.gather([RankShare(self.own_forwards, mine, rank, self.stop)])
        stops = [f'rank {share.rank}: {share.stop}' for share in ranks if share.stop is not None]
        if stops:  # every rank has now joined the gather: all of them stop, with the same message
            raise RuntimeError('ddapo_attention stopped the run on every rank: ' + '; '.join(stops))
        shared = [output for share in ranks for output in share.outputs]
        record = orm.step_log.log(self.mode, [s.diagnostics for s in shared],
                                  [self.samples[p] for p in sorted(self.samples)], swift.step, swift.output_dir,
                                  swift.rollout, swift.spec, None if validity is None else [s.validity for s in shared],
                                  swift.path.describe())
        record.metrics['ddapo/own_forwards'] = float(sum(share.own_forwards for share in ranks))
        record.metrics.update(self.metrics)
        for statistic, reasons in record.undefined.items():
            for reason in reasons:
                orm.warn_validity(statistic, reason)
        if record.failure is not None:
            orm.diagnostic_failed('report', record.failure, self)
        if record.pictures:  # the report's pictures in TensorBoard / wandb / swanlab
            try:
                swift.log_pictures(record.step, record.pictures)
            except Exception as error:
                orm.diagnostic_failed('trackers', error, self)
        record.metrics.update({f'ddapo/diagnostics_failed/{kind}': float(n) for kind, n in self.failures.items()})
        swift.log_metrics(self.mode, record.metrics)
        if not grouped:
            return [r.reward for r in results]
        return group_variant(shared, rank, len(rows), self.config.sigma, gated=orm.gate is not None)
