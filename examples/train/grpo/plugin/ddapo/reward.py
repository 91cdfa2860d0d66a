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
    on the first call of each path (DDAPO_SELF_CHECK=1, the default): a few outputs per rank again with the eager
          reference (ddapo.core.self_check); a path that disagrees is left, on every rank
    --> List[Optional[float]], by position

One call's state and stages are a `ddapo.call.RewardCall`; this class keeps what lives across calls.

Needs the trainer in the reward kwargs (``trainer``), which the ms-swift patch in ``swift_patches/`` provides
(for token weights, the second patch there; for reading the old log-prob forward, the third); ``plugin.py`` applies
them.
"""
from collections import Counter
from typing import Dict, List, Optional

import torch
from swift.rewards import ORM
from swift.utils import get_logger

from ddapo.call import RewardCall
from ddapo.core.cadence import Cadence
from ddapo.core.config import DDAPOConfig
from ddapo.core.scorer import Scored
from ddapo.core.self_check import Verdict, next_path, tolerance
from ddapo.core.validity import OutputValidity
from ddapo.engine.scheduler import ForwardRun, ForwardScheduler
from ddapo.ms_swift.adapter import SwiftTrainer
from ddapo.ms_swift.trainer_io import registered_reward
from ddapo.step_log import StepLogger, debug_lines, layers_note

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
        # which calls are validation steps (Eq. 12-14): a cadence per mode, so that evaluations never move training's
        self._validation = {mode: Cadence(self.config.validate_steps) for mode in ('train', 'eval')}
        self.checked: Dict[str, Verdict] = {}  # the self-check's verdict per path read so far
        self.not_applicable: Counter = Counter()
        self.unweighted: Counter = Counter()  # outputs with a reward but no token weights, by reason
        self.validity_undefined: Counter = Counter()  # validation steps: 'statistic/reason' -> steps or outputs
        self.uncaptured = 0  # rows the old log-prob forward did not capture (scored with a forward of its own)
        self.diagnostics_failed: Counter = Counter()  # report, pictures, trackers: failures over the run, by kind
        self._warned: set = set()
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
        self.swift.install_warmup(self.config)
        path = self.swift.choose_forward(self.config, self.validating)
        logger.info(f'[DDAPO] policy model {spec.model_type}: {spec.num_layers} decoder layers, {layers_note(spec)}; '
                    f'vision token ids {sorted(spec.vision_token_ids)}')
        logger.info(f'[DDAPO] completions from: {self.swift.rollout}')
        logger.info(f'[DDAPO] attention read: {path.describe()}')
        check = (f'self-check against eager on the first call of each path (DDAPO_SELF_CHECK=1: a few outputs per '
                 f'rank, at least one whole group; tolerance {tolerance(self.swift.precision):.0e} on R^bal for '
                 f'{self.swift.precision})' if self.config.self_check else
                 'no self-check (DDAPO_SELF_CHECK=0)')
        logger.info(f'[DDAPO] checks: the ids at every position read are the output\'s own (every call, no forward; '
                    f'a sample the old log-prob forward holds elsewhere falls back to a forward of its own); {check}')

    def validating(self, step: int, mode: str) -> bool:
        """Whether the ``mode`` (train / eval) call at ``global_step`` ``step`` is a validation step; the same answer
        for every call of that step and mode (the capture, then the reward call)."""
        return self._validation[mode].due(step)

    def __call__(self, completions: List[str], **kwargs) -> List[Optional[float]]:
        trainer = kwargs.get('trainer')
        if trainer is None:
            raise RuntimeError(MISSING_TRAINER)  # the same on every rank, before any collective
        if self.swift is None or self.swift.trainer is not trainer:
            self.on_trainer_init(trainer)
        return RewardCall(self, completions, kwargs).run()

    def move_to(self, verdict: Verdict) -> str:
        """After a failed self-check (every rank, the same verdict): leave ``verdict.path`` from the next call on, for
        `next_path` (never a path that disagreed already). Returns where to."""
        failed = [path for path, v in self.checked.items() if not v.agrees]
        moved = next_path(verdict.path, self.scheduler.attention, failed)
        if verdict.path == 'old_logps':
            self.swift.use_own(f'the self-check found old_logps {verdict.max_abs_diff:.3g} off eager')
        self.scheduler.attention = moved.split('/', 1)[1]
        return moved

    # what calls count and warn, over the run
    def count(self, scored: Scored, call: RewardCall) -> Scored:
        """Count a not-applicable result (``not_applicable``, warned once per reason); under DDAPO_STRICT it stops the
        call on every rank, after the gather."""
        reason = scored.diagnostics.reason
        if self.config.strict:
            call.stop_call(f'DDAPO_STRICT=1: the ddapo_attention reward is not applicable ({reason}): '
                           f'{scored.detail}')
        if reason not in self.not_applicable:
            logger.warning(f'[DDAPO] reward is None ({reason}): {scored.detail}. Counted in not_applicable and '
                           'ddapo/not_applicable_frac; warned once per reason.')
        self.not_applicable[reason] += 1
        return scored

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(f'[DDAPO] {message}; warned once.')

    def diagnostic_failed(self, kind: str, error: Exception, call: RewardCall) -> None:
        """A report, picture or tracker failure: warned once per kind, counted in ddapo/diagnostics_failed/<kind>; the
        rewards and the run go on."""
        if kind not in self.diagnostics_failed:
            logger.warning(f'[DDAPO] the {kind.replace("_", " ")} failed ({type(error).__name__}: {error}); the rewards '
                           f'are unaffected. Counted in ddapo/diagnostics_failed/{kind}; warned once.')
        self.diagnostics_failed[kind] += 1
        call.failures[kind] += 1

    def warn_validity(self, statistic: str, reason: str) -> None:
        """Warn once per undefined validity statistic and reason (the step's metrics count them)."""
        key = f'{statistic}/{reason}'
        if key not in self.validity_undefined:
            what = ('an output left out of the validity statistics' if statistic == 'left_out' else
                    f'ddapo/validity/{statistic} undefined')
            logger.warning(f'[DDAPO] DDAPO_VALIDATE_STEPS: {what} ({reason}): {UNDEFINED.get(reason, reason)}. Counted '
                           f'in ddapo/validity/{"" if statistic == "left_out" else "undefined/"}{key}; warned once.')
        self.validity_undefined[key] += 1

    def note_padding(self, padding: int, forwards: int) -> None:
        if padding and self.scheduler.padding_forwards == padding:  # this rank's first padding forwards of the run
            logger.info(f'[DDAPO] rank {self.swift.rank} runs {padding} padding forward(s) after its {forwards}, as '
                        'many as the busiest rank (ZeRO-3 gathers parameters in every forward); logged once per run')

    def debug(self, report, run: ForwardRun, layers: List[int], scored: Optional[Scored]) -> None:
        """Seed 001's one-time report, on the first output of the run (and before the error of an incomplete one)."""
        if self._debug_pending or (not run.out_of_memory and not run.complete):
            self._debug_pending = False
            for line in debug_lines(self.config, self.swift.spec, self.scheduler.implementation, report, run, layers,
                                    scored):
                logger.info(f'[DDAPO_DEBUG] {line}')
