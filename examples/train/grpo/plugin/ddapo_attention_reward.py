"""``DDAPOAttentionORM``: the DDAPO attention-balance reward ``R^bal`` (Eq. 7) for ms-swift GRPO.

Per completion ``o_i``:

    reward kwargs row --ddapo_swift.encode_completion--> [q ; o_i] with the trainer's template, exact
                                                         generated ids, prompt length P
                      --ddapo_key_sets.build_key_sets--> T (text_keys), V (vision_keys)
                      --ddapo_swift.policy_forward + ddapo_capture--> one eager forward, Eq. (1) masses
                                                         of every language-model layer
                      --ddapo_formulas--> m^T_{i,t} over the last K = 8 layers, rho_text, rho_vis,
                                          TDR_i, R^bal_i = 1 / (1 + TDR_i)

Needs the trainer in the reward kwargs (``trainer``), which the ms-swift patch in ``swift_patches/``
provides; ``plugin.py`` applies it.
"""
from collections import Counter
from typing import Any, Dict, List, Optional

from swift.rewards import ORM
from swift.utils import get_logger

from ddapo_capture import ATTENTION_NAME, LayerCapture, capturing
from ddapo_config import DDAPOConfig
from ddapo_formulas import DDAPOScores, NotApplicable, layer_set, sequence_scores, token_text_mass
from ddapo_key_sets import KeySets, build_key_sets
from ddapo_swift import (EncodedCompletion, ForwardReport, GeneratedIdsMismatch, ModelSpec, encode_completion,
                         model_spec, policy_forward, reward_rows)

logger = get_logger()

LAYERS = 'last:8'  # Lambda: the paper's last K = 8 language-model layers (all of them when L < 8)
MISSING_TRAINER = (
    "ddapo_attention needs the GRPO trainer in the reward kwargs ('trainer'), and it is missing: the ms-swift "
    'patch is not applied. Load the reward through --external_plugins examples/train/grpo/plugin/plugin.py '
    '(it applies swift_patches/grpo_reward_kwargs.py), or apply swift_patches/ms_swift_4.6_grpo_reward_kwargs.diff '
    'to ms-swift.')


class DDAPOAttentionORM(ORM):
    """``R^bal_i = 1 / (1 + TDR_i)`` of Eq. (7) for every completion; ``None`` where it is undefined.

    ``None`` (notation section 4: text-only prompt, empty completion, ...) is counted per reason in
    ``not_applicable`` and warned once per reason; it is never replaced by a constant.
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
        self._debug_pending = self.config.debug

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
        layers = layer_set(self.spec.num_layers, LAYERS)
        rewards: List[Optional[float]] = []
        with policy_forward(trainer) as (forward, report):
            for row in reward_rows(kwargs, len(completions)):
                rewards.append(self._reward(trainer, row, forward, report, layers))
        return rewards

    def _reward(self, trainer, row: Dict[str, Any], forward, report: ForwardReport,
                layers: List[int]) -> Optional[float]:
        spec = self.spec
        try:
            encoded = encode_completion(trainer, row)
        except GeneratedIdsMismatch as error:
            return self._none('generated_ids_mismatch', str(error))
        key_sets = build_key_sets(encoded.input_ids, encoded.prompt_len, spec.vision_token_ids, spec.special_ids,
                                  spec.im_start_id, spec.im_end_id, spec.system_role_ids)
        capture = LayerCapture(key_sets, encoded.prompt_len, encoded.num_generated, spec.num_layers)
        with capturing(capture):
            outputs = forward(**encoded.forward_kwargs)
        scores: Optional[DDAPOScores] = None
        reason: Optional[NotApplicable] = None
        if len(capture.captured) == spec.num_layers:
            try:
                scores = sequence_scores(token_text_mass(capture.masses[layers]), key_sets.num_text_keys,
                                         key_sets.num_vision_keys)
            except NotApplicable as error:
                reason = error
        if self._debug_pending:
            self._debug_pending = False
            self._log_debug(encoded, key_sets, report, outputs, capture, layers, scores)
        if len(capture.captured) != spec.num_layers:
            raise RuntimeError(f'ddapo_attention captured {len(capture.captured)} of {spec.num_layers} language-model '
                               f'layers: the model did not run its attention through {ATTENTION_NAME!r}. '
                               'This model is not supported; see the [DDAPO_DEBUG] lines above.')
        if reason is not None:
            return self._none(reason.reason, reason.detail)
        return scores.reward_balance

    def _none(self, reason: str, detail: str) -> None:
        if reason not in self.not_applicable:
            logger.warning(f'[DDAPO] reward is None ({reason}): {detail}. Counted in not_applicable; '
                           'warned once per reason.')
        self.not_applicable[reason] += 1
        return None

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
