"""``DDAPOAttentionORM``: the DDAPO attention-balance reward ``R^bal`` (Eq. 7) for ms-swift GRPO.

Per completion ``o_i``:

    reward kwargs row --ddapo_swift.encode_completion--> [q ; o_i] with the trainer's template, exact
                                                         generated ids, prompt length P
                      --ddapo_key_sets.build_key_sets--> T (text_keys), V (vision_keys)
                      --ddapo_swift.policy_forward + ddapo_capture--> one eager forward, Eq. (1) masses
                                                         of every language-model layer
                      --ddapo_formulas--> m^T_{i,t} over the last K = 8 layers, rho_text, rho_vis,
                                          TDR_i, R^bal_i = 1 / (1 + TDR_i)

The same numbers feed the step's ``ddapo/*`` metrics (ddapo_diagnostics) and, on logging steps, the
report under ``<output_dir>/ddapo/`` (ddapo_report): no extra forward.

Needs the trainer in the reward kwargs (``trainer``), which the ms-swift patch in ``swift_patches/``
provides; ``plugin.py`` applies it.
"""
import gc
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from accelerate.utils import gather_object
from swift.rewards import ORM
from swift.utils import get_logger

from ddapo_capture import ATTENTION_NAME, LayerCapture, capturing
from ddapo_config import DDAPOConfig
from ddapo_diagnostics import SampleDiagnostics, segment_vision_mass, step_metrics
from ddapo_formulas import DDAPOScores, NotApplicable, layer_set, sequence_scores, token_text_mass
from ddapo_key_sets import KeySets, build_key_sets
from ddapo_report import ReportSample, ReportWriter, image_heatmaps
from ddapo_swift import (EncodedCompletion, ForwardReport, GeneratedIdsMismatch, ModelSpec, encode_completion,
                         image_merge_size, model_spec, padding_row, policy_forward, processed_images,
                         reward_rows)

logger = get_logger()

LAYERS = 'last:8'  # Lambda: the paper's last K = 8 language-model layers (all of them when L < 8)
MISSING_TRAINER = (
    "ddapo_attention needs the GRPO trainer in the reward kwargs ('trainer'), and it is missing: the ms-swift "
    'patch is not applied. Load the reward through --external_plugins examples/train/grpo/plugin/plugin.py '
    '(it applies swift_patches/grpo_reward_kwargs.py), or apply swift_patches/ms_swift_4.6_grpo_reward_kwargs.diff '
    'to ms-swift.')


@dataclass
class _Prepared:
    """One row encoded and ready for its forward."""
    row: Dict[str, Any]
    encoded: EncodedCompletion
    key_sets: KeySets


@dataclass
class _Scored:
    """One output after its forward: the reward and what the metrics and the report need."""
    reward: Optional[float]
    diagnostics: SampleDiagnostics
    report: Optional[ReportSample] = None


class DDAPOAttentionORM(ORM):
    """``R^bal_i = 1 / (1 + TDR_i)`` of Eq. (7) for every completion; ``None`` where it is undefined.

    ``None`` (notation section 4: text-only prompt, empty completion, ...) is counted per reason in
    ``not_applicable`` and in ``ddapo/not_applicable_frac``, and warned once per reason; it is never
    replaced by a constant.
    """

    def __init__(self, args=None, **kwargs):
        super().__init__(args, **kwargs)
        if args is not None and getattr(args, 'use_vllm', False):
            raise ValueError('ddapo_attention reads attention from its own forward of the policy model, and a vLLM '
                             'rollout engine returns no attention to pair it with: run GRPO with --use_vllm false.')
        self.config = DDAPOConfig.from_env()
        logger.info(f'[DDAPO] ddapo_attention reward settings: {self.config.describe()}; layers read: {LAYERS}')
        self.spec: Optional[ModelSpec] = None
        self.not_applicable: Counter = Counter()
        self.last_metrics: Dict[str, float] = {}
        self._debug_pending = self.config.debug
        self._last_report_step: Optional[int] = None

    def on_trainer_init(self, trainer) -> None:
        """Called by the patched trainer once its rewards exist: validate the policy model at start."""
        self.spec = model_spec(trainer)
        logger.info(f'[DDAPO] policy model: {self.spec.num_layers} language-model layers, vision token ids '
                    f'{sorted(self.spec.vision_token_ids)}')

    def __call__(self, completions: List[str], **kwargs) -> List[Optional[float]]:
        trainer = kwargs.get('trainer')
        if trainer is None:
            raise RuntimeError(MISSING_TRAINER)
        if self.spec is None:
            self.on_trainer_init(trainer)
        mode = 'train' if trainer.model.training else 'eval'
        report_slots = self._report_slots(trainer)
        layers = layer_set(self.spec.num_layers, LAYERS)
        scored: List[_Scored] = []
        with policy_forward(trainer) as (forward, report):
            prepared = [self._prepare(trainer, row) for row in reward_rows(kwargs, len(completions))]
            runnable = [p for p in prepared if isinstance(p, _Prepared)]
            padding = self._padding_forwards(len(runnable))  # agreed before any forward: see the docstring
            for item in prepared:
                if isinstance(item, _Prepared):
                    want_report = sum(s.report is not None for s in scored) < report_slots
                    item = self._run(trainer, item, forward, report, layers, want_report)
                scored.append(item)
            if padding:
                kwargs = (runnable[0].encoded if runnable else encode_completion(trainer, padding_row(trainer)))
                for _ in range(padding):
                    forward(**kwargs.forward_kwargs)
        self._log_step(trainer, mode, scored)
        return [s.reward for s in scored]

    def _prepare(self, trainer, row: Dict[str, Any]):
        """Encode one row and find its key sets: a `_Prepared`, or a `_Scored` None when it cannot be encoded."""
        spec = self.spec
        try:
            encoded = encode_completion(trainer, row)
        except GeneratedIdsMismatch as error:
            return self._none('generated_ids_mismatch', str(error))
        key_sets = build_key_sets(encoded.input_ids, encoded.prompt_len, spec.vision_token_ids, spec.special_ids,
                                  spec.im_start_id, spec.im_end_id, spec.system_role_ids)
        return _Prepared(row, encoded, key_sets)

    @staticmethod
    def _padding_forwards(local_forwards: int) -> int:
        """How many padding forwards this rank runs so that every rank runs as many as the busiest one.

        Under DeepSpeed ZeRO-3 every forward gathers parameters collectively: a rank that runs fewer
        forwards than the others (fewer rows, or rows that could not be encoded) would hang them all. The
        counts are agreed before the first forward, since this gather is itself a collective that must not
        meet another rank's forward.
        """
        return max(gather_object([local_forwards])) - local_forwards

    def _run(self, trainer, item: '_Prepared', forward, report: ForwardReport, layers: List[int],
             want_report: bool) -> _Scored:
        spec, encoded, key_sets = self.spec, item.encoded, item.key_sets
        capture = LayerCapture(key_sets, encoded.prompt_len, encoded.num_generated, spec.num_layers)
        try:
            with capturing(capture):
                outputs = forward(**encoded.forward_kwargs)
        except torch.OutOfMemoryError as error:
            del capture
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self._none('out_of_memory', f'the reward forward of a {len(encoded.input_ids)}-token sequence '
                              f'ran out of memory ({str(error).splitlines()[0][:200]})')
        if len(capture.captured) != spec.num_layers:
            self._log_debug(encoded, key_sets, report, outputs, capture, layers, None)
            raise RuntimeError(f'ddapo_attention captured {len(capture.captured)} of {spec.num_layers} language-model '
                               f'layers: the model did not run its attention through {ATTENTION_NAME!r}. '
                               'This model is not supported; see the [DDAPO_DEBUG] lines above.')
        read = capture.masses[layers]
        m_text = token_text_mass(read)
        generated = encoded.input_ids[encoded.prompt_len:encoded.prompt_len + encoded.num_generated]
        scores: Optional[DDAPOScores] = None
        try:
            if not bool(torch.isfinite(read).all()):
                raise NotApplicable('non_finite_attention', 'the attention probabilities hold inf or NaN '
                                    '(fp16 overflow?); the reward forward runs in the model dtype')
            if generated and all(token in spec.special_ids for token in generated):
                raise NotApplicable('only_special_tokens', f'the completion is only special tokens {generated}')
            scores = sequence_scores(m_text, key_sets.num_text_keys, key_sets.num_vision_keys)
        except NotApplicable as error:
            return self._none(error.reason, error.detail)
        finally:
            if self._debug_pending:
                self._debug_pending = False
                self._log_debug(encoded, key_sets, report, outputs, capture, layers, scores)
        diagnostics = SampleDiagnostics(scores=scores, segment_M_vis=segment_vision_mass(capture.masses))
        sample = self._report_sample(trainer, item.row, encoded, capture, layers, m_text, scores) if want_report else None
        return _Scored(scores.reward_balance, diagnostics, sample)

    def _none(self, reason: str, detail: str) -> _Scored:
        if self.config.strict:
            raise RuntimeError(f'DDAPO_STRICT=1: the ddapo_attention reward is not applicable ({reason}): {detail}')
        if reason not in self.not_applicable:
            logger.warning(f'[DDAPO] reward is None ({reason}): {detail}. Counted in not_applicable and '
                           'ddapo/not_applicable_frac; warned once per reason.')
        self.not_applicable[reason] += 1
        return _Scored(None, SampleDiagnostics(reason=reason))

    def _report_slots(self, trainer) -> int:
        """Outputs to show in the report this call: on the main process, once per ``logging_steps`` steps."""
        if not self.config.report or not self.config.report_samples or not trainer.accelerator.is_main_process:
            return 0
        state = getattr(trainer, 'state', None)
        step = getattr(state, 'global_step', 0)
        every = max(1, getattr(trainer.args, 'logging_steps', 1) or 1)
        if self._last_report_step is not None and step - self._last_report_step < every:
            return 0
        return self.config.report_samples

    def _report_sample(self, trainer, row, encoded: EncodedCompletion, capture: LayerCapture, layers: List[int],
                       m_text, scores: DDAPOScores) -> ReportSample:
        tokenizer = trainer.template.tokenizer
        generated = encoded.input_ids[encoded.prompt_len:encoded.prompt_len + encoded.num_generated]
        grid = encoded.forward_kwargs.get('image_grid_thw')
        images, heatmaps = processed_images(trainer, row, grid), []
        if images:
            ids = encoded.input_ids[:encoded.prompt_len]
            image_positions = [p for p, token in enumerate(ids) if token == self.spec.image_token_id]
            key_attention = capture.key_attention[layers].mean(dim=0)
            heatmaps = image_heatmaps(key_attention[image_positions], grid.tolist(), image_merge_size(trainer))
        return ReportSample(
            title=f"prompt {row.get('prompt_id') or '?'}, request {str(row.get('request_id') or '?')[:8]}",
            tokens=[tokenizer.decode([token]) for token in generated],
            m_vis=[1.0 - float(v) for v in m_text],
            tdr=scores.tdr,
            reward_balance=scores.reward_balance,
            images=images,
            heatmaps=heatmaps)

    def _log_step(self, trainer, mode: str, scored: List[_Scored]) -> None:
        """``ddapo/*`` metrics over every rank's outputs into the trainer's log; the report on logging steps."""
        everything = gather_object([s.diagnostics for s in scored])  # every rank calls the reward each step
        self.last_metrics = step_metrics(everything)
        store = getattr(trainer, '_metrics', None)
        if store is not None:
            for key, value in self.last_metrics.items():
                if math.isfinite(value):  # the trainer averages lists: a NaN would poison the logged mean
                    store[mode][key].append(value)
        samples = [s.report for s in scored if s.report is not None]
        if samples:
            step = getattr(getattr(trainer, 'state', None), 'global_step', 0)
            self._last_report_step = step
            ReportWriter(os.path.join(trainer.args.output_dir, 'ddapo')).write_step(
                step, mode, self.last_metrics, samples)

    def _log_debug(self, encoded: EncodedCompletion, key_sets: KeySets, report: ForwardReport, outputs,
                   capture: LayerCapture, layers: List[int], scores: Optional[DDAPOScores]) -> None:
        """Seed 001's one-time report, on the first sample of the run."""
        kwargs = encoded.forward_kwargs
        attentions = getattr(outputs, 'attentions', None)
        lines = [
            f'forward kwargs keys: {sorted(kwargs)}; output_attentions: {kwargs.get("output_attentions", "not set")} '
            f"(not needed: attention is captured inside the attention function '{ATTENTION_NAME}', which runs the "
            "model's eager_attention_forward)",
            f'attention implementation before the switch: {report.attention_before}',
            f'attention implementation during the reward forward: {report.attention_during}',
            f'is_gradient_checkpointing before the reward forward: {report.gradient_checkpointing} (disabled during it)',
            f'output type: {type(outputs).__name__}; outputs.attentions: '
            f'{"None" if attentions is None else f"{type(attentions).__name__} of {len(attentions)}"}',
            f'layers captured: {len(capture.captured)} of {self.spec.num_layers}; layers read (Lambda, {LAYERS}): '
            f'{layers}',
            f'first sample: P={encoded.prompt_len}, |o_i|={encoded.num_generated}, |T|={key_sets.num_text_keys}, '
            f'|V|={key_sets.num_vision_keys}, ' +
            (f'TDR={scores.tdr:.4f}, R^bal={scores.reward_balance:.4f}' if scores else 'reward not applicable'),
        ]
        for line in lines:
            logger.info(f'[DDAPO_DEBUG] {line}')
