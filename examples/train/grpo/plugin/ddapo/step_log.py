"""What a reward call leaves besides its rewards: the step's ``ddapo/*`` metrics, the report under
``<output_dir>/ddapo/`` on logging steps, and the one-time ``[DDAPO_DEBUG]`` lines. It calls nothing on the trainer:
it gets values (the step, the output dir, the model spec, a `SampleView` per report sample) and returns a `StepLog`
(the metrics and the report's pictures), which the reward class hands to the ms-swift side.

    every rank's SampleDiagnostics --step_metrics (ddapo.core.diagnostics)--> ddapo/* into the trainer's metrics store
    the report's outputs (`StepLogger.choose`) --report_sample-------> ReportSample: tokens, m^V_{i,t}, heat maps
                                               --ddapo.core.report.ReportWriter--> report.md + PNGs, then the trackers
    the first output's forward --debug_lines--> seed 001's [DDAPO_DEBUG] report
    validation steps (DDAPO_VALIDATE_STEPS): every rank's OutputValidity --validity_statistics--> ddapo/validity/*
                                               (Eq. 14), the report's R^bal-D scatter and m^V-D plots
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ddapo.engine.capture import LayerCapture
from ddapo.core.cadence import Cadence
from ddapo.core.config import DDAPOConfig
from ddapo.core.diagnostics import SampleDiagnostics, segments, step_metrics
from ddapo.core.formulas import layer_set
from ddapo.core.report import ReportSample, ReportWriter, SampleView, fair_shares, image_heatmaps, trajectory_turns
from ddapo.engine.scheduler import ForwardRun, Output
from ddapo.core.scorer import Scored
from ddapo.core.validity import OutputValidity, undefined_metrics, validity_statistics

PATHS = {
    'shared': "one forward per prompt: [q ; o_1 ; ... ; o_G] with a tree mask, up to DDAPO_PACK_TOKENS={pack} tokens; "
              "outputs from sdpa, the generated rows' probabilities from the eager formula",
    'rows': "one forward per output; outputs from sdpa, the generated rows' probabilities from the eager formula",
    'eager': "one eager forward per output, the model's eager_attention_forward (the reference)",
}


def layers_note(spec) -> str:
    """Which decoder layers (0-based ``layer_idx``) are ``L_att`` and its thirds (the ``ddapo/<third>/M_V`` metrics)."""
    n = len(spec.attention_layers)
    thirds = ', '.join(f'{name} = {spec.decoder_layers(layer_set(n, name))}' for name in segments(n)[1:])
    return (f'attention layers L_att = decoder layers {list(spec.attention_layers)} ({n} of {spec.num_layers}, '
            'counted from 0)' + (f'; thirds of L_att: {thirds}' if thirds else '') + f'; L_att is {spec.layer_rule}')


def sample_title(outputs: Sequence[Output], output: Output, k: int) -> str:
    """``sample k: prompt <id>, output g of G`` (G: the outputs of that prompt in this call)."""
    prompt = output.row.prompt_id
    group = [o for o in outputs if o.row.prompt_id == prompt]
    place = next(i for i, o in enumerate(group) if o.position == output.position)
    label = str(prompt)[:8] if prompt not in (None, '') else '?'
    return f'sample {k + 1}: prompt {label}, output {place + 1} of {len(group)}'


def debug_lines(config: DDAPOConfig, spec, implementation: str, report, run: ForwardRun, layers: List[int],
                scored: Optional[Scored]) -> List[str]:
    """Seed 001's one-time report of the first reward forward (``report``:
    ``ddapo.ms_swift.forward_env.ForwardReport``)."""
    output = run.unit[0]
    kwargs = output.encoded.forward_kwargs
    attentions = getattr(run.model_outputs, 'attentions', None)
    scores = None if scored is None else scored.diagnostics.scores
    seen = set(run.capture.layers_seen) if run.capture is not None else set()
    if run.report is not None:  # read inside ms-swift's old log-prob forward, through the wrapper it registered
        implementation = report.attention_during.get('text_config', report.attention_during.get('config', {})).get(
            '_attn_implementation', implementation)
        path = ("reward path: DDAPO_FORWARD=old_logps (inside ms-swift's old log-prob forward: the trainer's own "
                "attention for the layer outputs, the eager formula for the generated rows); this micro-batch row: "
                f'{run.length} tokens')
    else:
        path = (f'reward path: DDAPO_ATTENTION={config.attention} '
                f'({PATHS[config.attention].format(pack=config.pack_tokens)}); this forward: '
                f'{run.length if run.capture is not None and run.capture.complete else None} tokens, '
                f'{len(run.unit)} output(s)')
    return [
        path,
        f'forward kwargs keys: {sorted(kwargs)}; output_attentions: {kwargs.get("output_attentions", "not set")} '
        f"(not needed: attention is captured inside the attention function '{implementation}')",
        f'attention implementation before the switch: {report.attention_before}',
        f'attention implementation during the reward forward: {report.attention_during}',
        f'is_gradient_checkpointing before the reward forward: {report.gradient_checkpointing} (disabled during it)',
        f'output type: {type(run.model_outputs).__name__}; outputs.attentions: '
        f'{"None" if attentions is None else f"{type(attentions).__name__} of {len(attentions)}"}',
        f'layers captured: {len(seen & set(spec.attention_layers))} of {len(spec.attention_layers)}, the '
        f'{layers_note(spec)}; layers read (Lambda, DDAPO_LAYERS={config.layers}): decoder layers '
        f'{spec.decoder_layers(layers)}'
        + ('; shared packing off: layers that are not full attention (linear attention carries state along the '
           'whole sequence, a sliding window counts positions) need one output per forward'
           if spec.hybrid and config.attention == 'shared' else ''),
        f'first sample: P={output.encoded.prompt_len}, |o_i|={len(output.generated)}, '
        f'|T|={output.key_sets.num_text_keys}, |V|={output.key_sets.num_vision_keys}, ' +
        ('' if output.encoded.rows is None else
         f'a trajectory of {len(output.encoded.turns)} generated turns (rows: the tokens the loss trains; |T|, |V| '
         f'as the last row sees them, V_env {int(output.key_sets.env_vision_keys.sum())}), ') +
        (f'TDR={scores.tdr:.4f}, R^bal={scores.reward_balance:.4f}' if scores else 'reward not applicable'),
    ]


@dataclass
class StepLog:
    """A call's ``ddapo/*`` metrics, the report's pictures ``{tag: PNG path}`` when it wrote a report step, on
    validation steps the undefined statistics' reasons (`ValidityStatistics.undefined`), and the error that stopped
    the report's writing, if one did (a diagnostic: the metrics are complete either way)."""
    metrics: Dict[str, float]
    pictures: Dict[str, str] = field(default_factory=dict)
    undefined: Dict[str, Dict[str, int]] = field(default_factory=dict)
    failure: Optional[Exception] = None
    step: int = 0  # the step number of the report section and the trackers' pictures (`report_step`)


def report_step(step: int, mode: str) -> int:
    """The step a call's report section and pictures are numbered with, as ``logging.jsonl`` numbers its scalars: a
    training call at ``global_step`` ``s`` computes the rewards of step ``s + 1`` (with calls every k steps, the first
    of them: its scalars are logged at the next logging step); an evaluation runs after step ``s`` and is logged as
    ``s``.

    >>> report_step(0, 'train'), report_step(2, 'eval')
    (1, 2)
    """
    return step if mode == 'eval' else step + 1


class StepLogger:
    """The step's metrics, and the report once per ``logging_steps`` steps, on the main process."""

    def __init__(self, config: DDAPOConfig):
        self.config = config
        self.last_metrics: Dict[str, float] = {}
        self._last_report: Optional[tuple] = None  # (step, mode) of the last report step written
        self._logging: Optional[Cadence] = None  # the logged steps' cadence (logging_steps comes with the trainer)

    def logged(self, step: int, logging_steps: int, mode: str = 'train') -> bool:
        """Whether the call at ``global_step`` ``step`` is a step the trainer logs its scalars for: every evaluation
        (its scalars are logged each time), and for training step 0 and every call since which a
        ``logging_steps``-th step was reached (`Cadence`: with a call every step, every ``logging_steps``-th step;
        with calls every k steps, the calls whose steps hold a logged one). Evaluations never move the training
        cadence.

        >>> logger = StepLogger(DDAPOConfig())
        >>> [step + 1 for step in range(8) if logger.logged(step, 3)], logger.logged(4, 3, 'eval')
        ([1, 3, 6], True)
        """
        if mode == 'eval':
            return True
        if self._logging is None or self._logging.every != logging_steps:
            self._logging = Cadence(logging_steps, first=True)
        return self._logging.due(step)

    def choose(self, outputs: List[Output], main_process: bool, step: int, logging_steps: int,
               validate: bool = False, mode: str = 'train') -> Dict[int, str]:
        """The outputs this call shows in the report, ``{position: title}``: the first ``DDAPO_REPORT_SAMPLES`` on the
        main process, on the steps the trainer logs its scalars (`logged`) and on every validation step
        (``validate``), once per step and mode (a held-out evaluation at a step has a report of its own); empty
        otherwise."""
        config = self.config
        logged = self.logged(step, logging_steps, mode)  # asked on every call: the cadence follows every step
        if not config.report or not config.report_samples or not main_process:
            return {}
        # one report per step (a step may call the reward more than once: gradient accumulation)
        if (step, mode) == self._last_report or not (validate or logged):
            return {}
        return {output.position: sample_title(outputs, output, k)
                for k, output in enumerate(outputs[:config.report_samples])}

    @staticmethod
    def report_sample(output: Output, capture: LayerCapture, layers: List[int], scored: Scored, title: str,
                      view: SampleView, image_token_id: Optional[int],
                      dependency: Optional[torch.Tensor] = None) -> ReportSample:
        """The report's view of one scored output (``scored.reward`` defined); ``view``: its tokens, pictures with their
        token grids, and texts; ``dependency``: its ``D_{i,t}`` (Eq. 12) on validation steps."""
        encoded, scores, row = output.encoded, scored.diagnostics.scores, output.row
        images, heatmaps = view.images, []
        if images:
            ids = encoded.input_ids[:encoded.key_len]  # a trajectory's keys hold the environment's images too
            image_positions = [p for p, token in enumerate(ids) if token == image_token_id]
            key_attention = capture.key_attention[layers].mean(dim=0)
            heatmaps = [fair_shares(heat, scores.num_text_keys, scores.num_vision_keys) for heat in
                        image_heatmaps(key_attention[image_positions], view.grids)]
        return ReportSample(
            title=title,
            tokens=view.tokens,
            m_vis=[1.0 - float(v) for v in scored.m_text],
            tdr=scores.tdr,
            reward_balance=scores.reward_balance,
            images=images,
            heatmaps=heatmaps,
            token_weights=scored.token_weights,
            question=view.question,
            image_paths=view.image_paths,
            solution=row.solution,
            completion=view.completion,
            vision_share=scores.num_vision_keys / (scores.num_text_keys + scores.num_vision_keys),
            dependency=None if dependency is None else dependency.tolist(),
            turns=None if encoded.rows is None else trajectory_turns(row.messages, encoded.turns, encoded.rows),
            M_V=scores.M_vis, M_V_env=scored.diagnostics.M_V_env, picture_images=[g.image for g in view.grids],
            entropy=scored.diagnostics.segment_entropy)

    def log(self, mode: str, diagnostics: List[SampleDiagnostics], samples: List[ReportSample], step: int,
            output_dir: str, rollout: str, spec, validity: Optional[List[OutputValidity]] = None,
            forward: str = '') -> StepLog:
        """``ddapo/*`` over every rank's outputs (on validation steps, ``validity`` given, also ``ddapo/validity/*``,
        Eq. 14); the report step under ``output_dir/ddapo`` when ``samples`` were chosen, its pictures tagged
        ``ddapo/<mode>/<name>`` for the trackers. ``step``: the trainer's global step (the rewards of step N are
        computed while it is still N - 1; logging.jsonl says N). ``forward``: where the attention was read
        (``ForwardPath.describe``), for the report's header."""
        self.last_metrics = step_metrics(diagnostics)
        statistics = None
        if validity is not None:
            statistics = validity_statistics(validity)
            self.last_metrics.update({**statistics.metrics, **undefined_metrics(statistics.undefined)})
        undefined = statistics.undefined if statistics is not None else {}
        number = report_step(step, mode)
        if not samples:
            return StepLog(self.last_metrics, undefined=undefined, step=number)
        self._last_report = (step, mode)
        header = [f'- completions from: {rollout}', f'- attention read: {forward}']
        try:  # a diagnostic: a failure here is the caller's to count, never the step's
            pictures = ReportWriter(os.path.join(output_dir, 'ddapo'), header).write_step(
                number, mode, self.last_metrics, samples, layers_note(spec), statistics)
        except Exception as error:
            return StepLog(self.last_metrics, undefined=undefined, failure=error, step=number)
        return StepLog(self.last_metrics, {f'ddapo/{mode}/{name}': path for name, path in pictures.items()}, undefined,
                       step=number)
