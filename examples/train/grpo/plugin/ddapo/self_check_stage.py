"""The self-check stage of a reward call (``DDAPO_SELF_CHECK``, docs/reward.md "The self-check"): on the first call
that reads each path, a few outputs per rank are scored again by the eager reference (one sequence each, the modeling
file's own eager attention), every rank's largest difference is gathered, and a path that disagrees is left on every
rank. The eager forwards are a third source of captures for the same scheduler and scorer; the comparison, the
tolerances and where a path moves are pure (`ddapo.core.self_check`). Functions of a `ddapo.call.RewardCall`.
"""
from typing import Dict, List

from swift.utils import get_logger

from ddapo.core.self_check import Verdict, check_sample, difference, tolerance
from ddapo.engine.scheduler import ForwardRun, ForwardScheduler, Output
from ddapo.ms_swift.old_logps import OLD_LOGPS

logger = get_logger()


def balance_of(scored):
    """``R^bal_i`` (Eq. 7) of a result, whatever ``DDAPO_REWARD``; None where undefined."""
    scores = None if scored is None else scored.diagnostics.scores
    return None if scores is None else scores.reward_balance


def pending_checks(call, captured: List[int], own: List[int]) -> Dict[str, List[int]]:
    """The paths this call reads that are not checked yet, each with the positions it scored: ``old_logps`` (the
    captured rows) and ``own/<attention>`` (the reward's own forwards: every row on an own or validation call, the
    rows that fell back on an old_logps call that checks old_logps too). The same names on every rank: they come
    from the run's state, never from this rank's rows."""
    orm, pending = call.orm, {}
    if not call.config.self_check:
        return pending
    if call.path == OLD_LOGPS and OLD_LOGPS not in orm.checked:
        pending[OLD_LOGPS] = captured
    own_path = f'own/{call.scheduler.attention}'
    if own_path != 'own/eager' and own_path not in orm.checked and (call.path != OLD_LOGPS or pending):
        pending[own_path] = own
    return pending


def self_check(call, captured: List[int], own: List[int], runs: List[ForwardRun], titles: Dict[int, str]) -> None:
    """On the first call of a path (every rank reaches it on the same call, `pending_checks`): this rank's first
    group of outputs the path scored, and a few more, scored again by eager (one sequence each), and every rank's
    largest difference gathered. Agreement is logged; a disagreement moves every rank off that path
    (`next_path`) and replaces this call's rewards with eager's. Every rank runs the eager forwards and the gather
    whatever happened before (under ZeRO-3 both are collectives)."""
    orm, swift = call.orm, call.swift
    pending = pending_checks(call, captured, own)
    if not pending:
        return
    chosen: Dict[str, List[int]] = {path: [] for path in pending}
    with call.stopping('the self-check'):  # local work only: no collective inside
        for path, positions in pending.items():
            scored = [p for p in positions if balance_of(call.results[p]) is not None]
            chosen[path] = [scored[i] for i in check_sample([call.rows[p].prompt_id for p in scored])]
    eager = eager_runs(call, sorted({p for positions in chosen.values() for p in positions}), {}, validate=False)
    local = {path: (0.0, 0) for path in pending}
    with call.stopping('the self-check'):
        values = {}
        for run in eager:
            for k, output in enumerate(run.unit):
                result = call.score(output, run, k, None, count=False)
                values[output.position] = (balance_of(result), result.diagnostics.reason or '')
        for path, positions in chosen.items():
            local[path] = difference([balance_of(call.results[p]) for p in positions],
                                     [values.get(p, (None, 'not_scored'))[0] for p in positions],
                                     [values.get(p, (None, 'not_scored'))[1] for p in positions])
    shares = swift.gather([local])  # every rank, whatever happened above
    verdicts = []
    for path in pending:
        compared = sum(share.get(path, (0.0, 0))[1] for share in shares)
        if compared:  # nothing scored on any rank: the path is checked on a later call
            worst = max(share.get(path, (0.0, 0))[0] for share in shares)
            verdicts.append(Verdict(path, worst, compared, tolerance(swift.precision)))
    for verdict in verdicts:
        orm.checked[verdict.path] = verdict
        if verdict.agrees and swift.is_main_process:
            logger.info(verdict.message())
    if verdicts:
        call.metrics['ddapo/self_check/max_abs_diff'] = max(v.max_abs_diff for v in verdicts)
    failed = [v for v in verdicts if not v.agrees]
    if not failed:
        return
    for verdict in failed:
        logger.warning(verdict.message(orm.move_to(verdict)))
    before = {p: balance_of(r) for p, r in enumerate(call.results)}
    with call.stopping('the self-check\'s eager forwards'):
        read_positions = sorted(o.position for run in runs for o in run.unit)
        call.samples, call.validity, call.dependencies = {}, {}, {}
        call.score_runs(eager_runs(call, read_positions, titles, call.validate), None, titles, count=False)
        for position in read_positions:  # a reward eager could not give is a None like any other: counted
            if before[position] is not None and call.results[position].reward is None:
                call.orm.count(call.results[position], call)


def eager_runs(call, positions: List[int], titles: Dict[int, str], validate: bool) -> List[ForwardRun]:
    """The rows at ``positions`` encoded by the reward and run by the eager reference, one sequence each (a
    collective count under ZeRO-3, as every forward of the reward)."""
    eager = ForwardScheduler(call.config, call.swift.spec.attention_layers, call.swift.spec.hybrid, 'eager')
    encoded = {p: call.encode(p, call.rows[p]) for p in positions}
    outputs = [o for o in encoded.values() if isinstance(o, Output)]
    with call.swift.policy_forward(eager.implementation) as (env, _):
        runs = eager.run(outputs, env, report=titles, validate=validate).runs
    return runs + [ForwardRun([Output(p, call.rows[p], None, None)], None, failure=o.detail)
                   for p, o in encoded.items() if not isinstance(o, Output)]
