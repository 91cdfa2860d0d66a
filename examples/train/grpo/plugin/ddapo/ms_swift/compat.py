"""The compatibility list: which model families are supported, and every private or undocumented ms-swift,
transformers and accelerate name the project relies on, with the versions it was checked against
(``tests/test_swift_adapter.py`` resolves each of them in the installed packages; the reward warns at start when the
installed versions differ)."""
from typing import Dict, Tuple

# The transformers config model_types of the supported families (ddapo.ms_swift.families, the one table of them).
from ddapo.ms_swift.families import SUPPORTED_MODEL_TYPES  # noqa: F401

# The versions every name of `INTERNALS` was checked against (tests/test_swift_adapter.py checks them again).
CHECKED_AGAINST = {'ms-swift': '4.6.0', 'transformers': '5.19.0', 'accelerate': '1.16.0', 'peft': '0.20.0'}
# (module, attribute path, what relies on it): private or undocumented names. Instance attributes (``_metrics``,
# ``tb_writer``, ...) are checked in the class source that sets them (tests/test_swift_adapter.py).
INTERNALS = (
    ('swift.template', 'Template._get_system', 'SystemTurns: a rendering without the system turn'),
    ('swift.template', 'Template.encode', 'SystemTurns: probe conversations'),
    ('swift.template', 'Template.set_mode', 'policy_forward: train-mode encoding'),
    ('swift.template', 'Template.data_collator', 'encode_completion: one collated row'),
    ('swift.template', 'Template.remove_post_encode_hook', 'tests: the naive output_attentions reference'),
    ('swift.template', 'Template._get_response_prefix', "tests/test_key_sets: a thinking template's prefix"),
    ('swift.template', 'Template.template_meta', 'SystemTurns: support_system, template_type'),
    ('swift.template', 'Template.mode', 'policy_forward: saved and restored'),
    ('swift.template', 'Template.max_length', 'policy_forward: no truncation for the reward forward'),
    ('swift.template', 'Template.padding_free', 'policy_forward: no packing for the reward forward'),
    ('swift.template', 'Template.sequence_parallel_size', 'enable_token_weights, _forwards_are_collective'),
    ('swift.rlhf_trainers.utils', 'encode_sample', 'encode_completion: the GRPO encoding of one sample'),
    ('swift.rlhf_trainers.utils', 'load_pil_img', 'vision_pictures: the row images of the report'),
    ('swift.template.vision_utils', 'load_image', "row_image: a multi-turn scheduler's base64 images"),
    ('swift.rollout.multi_turn', 'MultiTurnScheduler.step', 'zoom_scheduler.py: the example scheduler'),
    ('swift.rollout.multi_turn', 'multi_turns', 'zoom_scheduler.py: registered under ddapo_zoom'),
    ('transformers.models.got_ocr2.image_processing_got_ocr2', 'get_optimal_tiled_canvas',
     "vision_pictures: InternVL's tile canvas for the report's heat maps"),
    ('swift.rl_core.data', 'GRPOSample.from_row', 'encode_completion: a row as GRPO samples are built'),
    ('swift.dataset', 'RowPreprocessor.batched_to_rows', 'reward_rows: the inverse of how ms-swift batches rows'),
    ('swift.trainers.utils', 'disable_gradient_checkpointing', 'policy_forward'),
    ('swift.model.utils', 'AttnImpl.attn_impl_keys', 'policy_forward: the attention keys saved and restored'),
    ('swift.utils', 'to_device', 'policy_forward'),
    ('swift.rewards', 'orms', 'registered_reward, plugin.py: the reward registry'),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer._compute_rewards_per_func', 'swift_patches.grpo_reward_kwargs'),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer._prepare_rewards', 'swift_patches.grpo_reward_kwargs'),
    ('swift.rlhf_trainers.grpo_trainer', 'score_completions', 'swift_patches.grpo_reward_kwargs'),
    ('swift.rl_core.grpo_algorithm', '_is_async_reward', 'swift_patches.grpo_reward_kwargs'),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer._postprocess_batch', 'swift_patches.grpo_token_weights'),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer.split_by_mini_batches', 'swift_patches.grpo_token_weights'),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer._generate_and_score_completions',
     'swift_patches.grpo_old_logps_scoring: the step skeleton it reorders'),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer._prepare_batch_inputs',
     'swift_patches.grpo_old_logps_scoring: the old log-prob forward, first per micro-batch'),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer._get_per_token_logps_and_entropies',
     'swift_patches.grpo_old_logps_scoring: the capture around the old log-prob forward'),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer._score_completions', 'swift_patches.grpo_old_logps_scoring'),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer._rollout_samples', 'swift_patches.grpo_old_logps_scoring'),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer._log_rollout', 'swift_patches.grpo_old_logps_scoring'),
    ('swift.rl_core.data', 'GRPOSample.to_reward_row',
     "ddapo.ms_swift.old_logps.encoding_of: a captured sample's system turn"),
    ('transformers.modeling_utils', 'ALL_ATTENTION_FUNCTIONS',
     "ddapo.ms_swift.attention.wrapped_attention: the trainer's own implementation"),
    ('swift.rlhf_trainers.rollout_mixin', 'RolloutTrainerMixin._move_model_to_vllm',
     "tests/vllm_cpu/weight_probe.py: vLLM's weights around the colocate sync"),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer._metrics',
     'SwiftTrainer.log_metrics, grpo_token_weights: the metrics store (instance attribute; tests/test_swift_rlhf_e2e)'),
    ('accelerate.state', 'AcceleratorState.deepspeed_plugin', '_forwards_are_collective: the ZeRO stage'),
    ('accelerate.utils', 'DeepSpeedPlugin.zero_stage', '_forwards_are_collective'),
    ('transformers.configuration_utils', 'PretrainedConfig._attn_implementation',
     'ddapo.ms_swift.attention.language_attention: the text config switch'),
    ('transformers.integrations.sdpa_attention', 'sdpa_attention_forward',
     'ddapo.ms_swift.attention.ddapo_rows_attention'),
    ('transformers.masking_utils', 'ALL_MASK_ATTENTION_FUNCTIONS', 'ddapo.ms_swift.attention.register_attention'),
    ('transformers.models.qwen2_5_vl.modeling_qwen2_5_vl', 'eager_attention_forward',
     "ddapo.ms_swift.attention: each modeling file's eager reference (every supported family has one)"),
    ('transformers.models.qwen2_5_vl.modeling_qwen2_5_vl', 'Qwen2_5_VLAttention.layer_idx',
     'ddapo.ms_swift.attention: which decoder layer an attention call belongs to'),
    ('transformers.models.qwen2_5_vl.modeling_qwen2_5_vl', 'Qwen2_5_VLAttention.num_key_value_groups',
     'ddapo.ms_swift.attention.ddapo_rows_attention: grouped-query heads'),
    ('transformers.integrations', 'TensorBoardCallback.tb_writer', 'tracker_runs (tests: TestTrackers)'),
    ('swift.template', 'Template.padding_side', 'ddapo.ms_swift.old_logps.micro_batch_layout: --padding_side'),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer._compute_teacher_logps',
     'swift_patches.grpo_old_logps_scoring: a forward of self.model the capture must not enter (OPSD)'),
    ('swift.rlhf_trainers.rollout_mixin', 'RolloutTrainerMixin._server_rollout',
     'OldLogpsCapture: sets dynamic_num_samples during the rollout (tests: TestFallbacksPerCall)'),
    ('swift.rlhf_trainers.rollout_mixin', 'RolloutTrainerMixin._template_context',
     "tests: the micro-batch as ms-swift's _prepare_batch_inputs encodes it"),
)



def version_drift() -> Dict[str, Tuple[str, str]]:
    """``{package: (checked against, installed)}`` where the installed version differs from `CHECKED_AGAINST`."""
    from importlib.metadata import PackageNotFoundError, version
    drift = {}
    for package, checked in CHECKED_AGAINST.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            installed = 'not installed'
        if installed != checked:
            drift[package] = (checked, installed)
    return drift
