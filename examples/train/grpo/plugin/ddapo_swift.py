"""The one adapter between the DDAPO reward and ms-swift: everything the reward needs from the trainer and from
ms-swift, and the model-family specifics. No other module of the reward imports ms-swift or reads the trainer.

    GRPO trainer      --SwiftTrainer---------> what the reward class uses, and nothing else: the template's encoding,
                                               the tokenizer, the policy model (unwrapped by accelerate, then PEFT),
                                               rank / step / output dir / logging steps, one gather across ranks,
                                               the metrics store, the trackers, the token-weight hand-over
    policy model      --model_spec-----------> vision token ids, special ids, the attention layers L_att read from
                                               the config's layer types (softmax attention only), family check
    trainer template  --SystemTurns----------> where the template renders the system turn (default system included)
    reward kwargs     --reward_rows----------> the per-output rows ms-swift batched (RowPreprocessor's inverse)
    row               --encode_completion----> the trainer's template encoding of [q ; o_i], exact
                                               generated ids, prompt_len P, the system turn, collated forward kwargs
    trainer           --policy_forward-------> no-grad eval forwards of the policy model with the
                                               language model's attention on a DDAPO implementation
                                               (ddapo_capture), every piece of state it touches restored on exit
    token weights     --token_weight_store---> trainer.token_advantage_weights[request_id], which the GRPO
                                               patch swift_patches/grpo_token_weights.py multiplies into the
                                               per-token advantages

`INTERNALS` lists every private or undocumented ms-swift, transformers and accelerate name the project relies on
(here, in ``ddapo_capture`` and in ``swift_patches/``), with the versions it was checked against;
``tests/test_swift_adapter.py`` resolves each of them in the installed packages.
"""
import json
import math
import os
import random
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple
from unittest import mock

import torch
from swift.model.utils import AttnImpl
from swift.rl_core.data import GRPOSample
from swift.rlhf_trainers.utils import encode_sample, load_pil_img
from swift.trainers.utils import disable_gradient_checkpointing
from swift.utils import get_logger, to_device

from ddapo_capture import EAGER_ATTENTION, attention_settings, language_attention, language_config
from ddapo_key_sets import inserted_span

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
    ('swift.rlhf_trainers.utils', 'load_pil_img', 'processed_images: the row images of the report'),
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
    ('swift.rlhf_trainers.rollout_mixin', 'RolloutTrainerMixin._move_model_to_vllm',
     "tests/vllm_cpu/weight_probe.py: vLLM's weights around the colocate sync"),
    ('swift.rlhf_trainers.grpo_trainer', 'GRPOTrainer._metrics',
     'SwiftTrainer.log_metrics, grpo_token_weights: the metrics store (instance attribute; tests/test_swift_rlhf_e2e)'),
    ('accelerate.state', 'AcceleratorState.deepspeed_plugin', '_forwards_are_collective: the ZeRO stage'),
    ('accelerate.utils', 'DeepSpeedPlugin.zero_stage', '_forwards_are_collective'),
    ('transformers.configuration_utils', 'PretrainedConfig._attn_implementation',
     'ddapo_capture.language_attention: the text config switch'),
    ('transformers.integrations.sdpa_attention', 'repeat_kv', 'ddapo_capture.eager_rows'),
    ('transformers.integrations.sdpa_attention', 'sdpa_attention_forward', 'ddapo_capture.ddapo_rows_attention'),
    ('transformers.masking_utils', 'ALL_MASK_ATTENTION_FUNCTIONS', 'ddapo_capture.register_attention'),
    ('transformers.models.qwen2_5_vl.modeling_qwen2_5_vl', 'eager_attention_forward',
     "ddapo_capture: each modeling file's eager reference (every supported family has one)"),
    ('transformers.models.qwen2_5_vl.modeling_qwen2_5_vl', 'Qwen2_5_VLAttention.layer_idx',
     'ddapo_capture: which decoder layer an attention call belongs to'),
    ('transformers.models.qwen2_5_vl.modeling_qwen2_5_vl', 'Qwen2_5_VLAttention.num_key_value_groups',
     'ddapo_capture.eager_rows: grouped-query heads'),
    ('transformers.integrations', 'TensorBoardCallback.tb_writer', 'tracker_runs (TestDashboard)'),
)

TEMPLATE_MODE = 'train'  # the mode ms-swift's GRPO encodes and forwards in (swift/pipelines/train/rlhf.py)
# Reward kwargs that are not columns of rows: ms-swift's trainer_state (and trajectory_inputs, a dict, in server
# multi-turn), the patch's trainer.
NOT_ROW_KWARGS = frozenset({'trainer', 'trainer_state', 'trajectory_inputs'})
# Layer types (transformers' `layer_types` vocabulary) whose token mixing is softmax attention: the layers L_att.
# Everything else (linear_attention: Gated DeltaNet, Mamba; conv; ...) has no attention probabilities to read.
SOFTMAX_LAYER_TYPES = ('full_attention', 'sliding_attention', 'chunked_attention')
# The families whose key sets, system turn, capture and GRPO runs are verified (README, "Supported models");
# HF config model_type, which is also ms-swift's model_type for these.
SUPPORTED_MODEL_TYPES = ('qwen2_vl', 'qwen2_5_vl', 'qwen3_vl', 'qwen3_vl_moe', 'qwen3_5', 'qwen3_5_moe')


@dataclass(frozen=True)
class ModelSpec:
    """What the reward needs to know of the policy model and its tokenizer."""
    vision_token_ids: FrozenSet[int]  # image_token_id, video_token_id of the model config
    image_token_id: Optional[int]
    special_ids: FrozenSet[int]
    num_layers: int  # L, the language model's decoder layers
    attention_layers: Tuple[int, ...] = ()  # L_att: 0-based decoder-layer indices of the softmax-attention layers
    model_type: str = ''

    @property
    def hybrid(self) -> bool:
        """Some decoder layers are not softmax attention (linear attention mixes the whole sequence recurrently)."""
        return len(self.attention_layers) < self.num_layers

    def decoder_layers(self, slots: Sequence[int]) -> List[int]:
        """Decoder-layer indices (0-based ``layer_idx``) of positions ``slots`` in ``L_att``."""
        return [self.attention_layers[i] for i in slots]


def attention_layers(config) -> Tuple[int, ...]:
    """``L_att``: the decoder layers whose token mixing is softmax attention, read from the language config's
    ``layer_types`` (transformers' per-layer type list); every layer when the config has none.

    Example: Qwen3.5's ``['linear_attention', 'linear_attention', 'linear_attention', 'full_attention', ...]``
    gives ``(3, 7, ...)``; Qwen2.5-VL's all-``full_attention`` list gives every layer.
    """
    text = language_config(config)
    num_layers = int(getattr(text, 'num_hidden_layers', 0) or 0)
    layer_types = getattr(text, 'layer_types', None) or ['full_attention'] * num_layers
    return tuple(i for i, kind in enumerate(layer_types[:num_layers]) if kind in SOFTMAX_LAYER_TYPES)


def rollout_engine(args) -> str:
    """Which engine made the completions the reward scores, for the start log and the report's header.

    The reward never reads the rollout's attention: in every ms-swift GRPO mode it runs its own forward of the
    trainer's model after the rollout has finished (vLLM asleep or on its own GPUs, offloaded weights reloaded).

    >>> from types import SimpleNamespace as A
    >>> rollout_engine(A(use_vllm=False))
    'Transformers generate (--use_vllm false)'
    >>> rollout_engine(A(use_vllm=True, vllm_mode='colocate', sleep_level=1, offload_model=False))
    'vLLM, colocate mode (--sleep_level 1)'
    >>> rollout_engine(A(use_vllm=True, vllm_mode='server', vllm_server_host=['10.0.0.2'], vllm_server_port=[8000],
    ...                  async_generate=True))[:51]
    'vLLM, server mode (10.0.0.2:8000), --async_generate'
    """
    if not getattr(args, 'use_vllm', False):
        return 'Transformers generate (--use_vllm false)'
    if getattr(args, 'vllm_mode', None) == 'server':
        urls = getattr(args, 'vllm_server_base_url', None) or [
            f'{host}:{port}' for host, port in zip(getattr(args, 'vllm_server_host', None) or [],
                                                   getattr(args, 'vllm_server_port', None) or [])]
        text = f'vLLM, server mode ({", ".join(urls)})'
        if getattr(args, 'async_generate', False):
            text += (', --async_generate true: the completions scored at step t were sampled with the weights of '
                     'step t-1, and the reward reads them with the weights of step t, the ones the loss uses')
        return text
    flags = [f'--sleep_level {getattr(args, "sleep_level", 0)}']
    flags += [f'--{name} true' for name in ('offload_model', 'offload_optimizer') if getattr(args, name, False)]
    return f'vLLM, colocate mode ({", ".join(flags)})'


def unwrap_policy(trainer) -> torch.nn.Module:
    """The Hugging Face model that really runs: DeepSpeed / DDP unwrapped by accelerate, then PEFT."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.get_base_model() if hasattr(model, 'get_base_model') else model


def model_spec(trainer) -> ModelSpec:
    """Read and validate the policy's vision token ids, special tokens and attention layers ``L_att``.

    Raises ValueError, at start, when the model config has no image/video token id (not a vision-language
    model), when its family is not one of `SUPPORTED_MODEL_TYPES`, or when its language model has no
    softmax-attention layer (nothing to read attention from).
    """
    model = unwrap_policy(trainer)
    config = model.config
    supported = ', '.join(SUPPORTED_MODEL_TYPES)
    vision_ids = {getattr(config, k, None) for k in ('image_token_id', 'video_token_id')} - {None}
    if not vision_ids:
        raise ValueError(f'ddapo_attention needs a vision-language model: the config of {type(model).__name__} '
                         f'(model_type={config.model_type!r}) has no image_token_id or video_token_id, so the '
                         f"prompt's vision keys V cannot be found. Use one of the supported families ({supported}), "
                         'or drop the reward.')
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f'ddapo_attention supports the model families {supported}; this model is '
                         f'{type(model).__name__} (model_type={config.model_type!r}), whose chat format, vision '
                         'tokens and attention layers it has not been verified on. Train one of those families, or '
                         'drop the reward.')
    tokenizer = trainer.template.tokenizer
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    num_layers = getattr(language_config(config), 'num_hidden_layers', None)
    if not num_layers:
        raise ValueError(f'ddapo_attention cannot find num_hidden_layers on the language config of {type(model).__name__}')
    layers = attention_layers(config)
    if not layers:
        kinds = sorted(set(getattr(language_config(config), 'layer_types', None) or []))
        raise ValueError(f'ddapo_attention reads softmax attention probabilities, and the language model of '
                         f'{type(model).__name__} has no softmax-attention layer (layer types {kinds}; attention '
                         f'layers are {", ".join(SOFTMAX_LAYER_TYPES)}): there is no alpha to read. Drop the reward '
                         'for this model.')
    return ModelSpec(
        vision_token_ids=frozenset(vision_ids),
        image_token_id=getattr(config, 'image_token_id', None),
        special_ids=frozenset(special),
        num_layers=int(num_layers),
        attention_layers=layers,
        model_type=config.model_type,
    )


def reward_rows(kwargs: Dict[str, Any], num_completions: int) -> List[Dict[str, Any]]:
    """The rows ms-swift batched into the reward kwargs (``RowPreprocessor.rows_to_batched`` of every sample's
    ``to_reward_row()``), back as rows: every kwarg but `NOT_ROW_KWARGS` is a column with one value per output.
    Raises RuntimeError when one is not (an ms-swift that batches its kwargs differently).

    >>> reward_rows({'trainer_state': None, 'prompt_id': ['a', 'b'], 'images': [None, ['x.png']]}, 2)
    [{'prompt_id': 'a', 'images': None}, {'prompt_id': 'b', 'images': ['x.png']}]
    """
    from swift.dataset import RowPreprocessor
    columns = {k: v for k, v in kwargs.items() if k not in NOT_ROW_KWARGS}
    odd = sorted(k for k, v in columns.items() if not isinstance(v, (list, tuple)) or len(v) != num_completions)
    if odd:
        raise RuntimeError(f'ddapo_attention reads one row per completion from the reward kwargs, and {odd} are not '
                           f'columns of {num_completions} values: this ms-swift batches reward kwargs differently '
                           f'from the one it was checked against ({CHECKED_AGAINST["ms-swift"]}).')
    return RowPreprocessor.batched_to_rows(columns) if columns else [{} for _ in range(num_completions)]


def generated_ids(response_token_ids: Sequence) -> List[int]:
    """The ids of the final generated turn (ms-swift stores a list per turn, or one flat list)."""
    if response_token_ids and isinstance(response_token_ids[0], (list, tuple)):
        return list(response_token_ids[-1])
    return list(response_token_ids or [])


@dataclass
class EncodedCompletion:
    """``x_i = [q ; o_i]`` as the template encodes it, and where ``o_i`` sits in it."""
    input_ids: List[int]
    prompt_len: int  # P
    num_generated: int  # |o_i|
    forward_kwargs: Dict[str, Any] = field(repr=False)
    labelled: bool = True  # every generated token carries a label, so it is a completion token of the GRPO loss
    system_turn: range = range(0)  # positions of the system turn (SystemTurns), empty without one


class NotEncodable(ValueError):
    """A row whose encoding the reward cannot use; ``reason`` is its not-applicable reason."""
    reason = 'not_encodable'


class GeneratedIdsMismatch(NotEncodable):
    """The template's encoding does not hold the generated ids right after the prompt."""
    reason = 'generated_ids_mismatch'


class SystemTurnNotFound(NotEncodable):
    """The template's encoding of a row does not hold its system turn where the template renders it."""
    reason = 'system_turn_not_found'


PROBE_TEXT = 'DDAPO probe'


class SystemTurns:
    """Where the trainer's template renders the system turn, found the way the template builds it.

    ms-swift's template renders the system message (the row's, or the default system it inserts, with tools and
    model-specific instructions folded in) from ``Template._get_system``; with ``None`` there it renders no system
    turn. Two renderings of a probe conversation, as is and with ``_get_system`` returning ``None``, differ by
    exactly the system turn (`inserted_span`), whatever the chat format. The block is cached per distinct system
    setting and checked token for token in every row's encoding: a row where it is not found gives None
    (``system_turn_not_found``), never a system turn counted as text. `check` refuses, at start, a chat format
    whose system turn cannot be located this way.
    """

    def __init__(self, template):
        self.template = template
        self._blocks: Dict[str, Tuple[int, Tuple[int, ...]]] = {}

    def _render(self, system: Optional[str], extra: Dict[str, Any], drop_system: bool) -> List[int]:
        messages = [{'role': 'system', 'content': system}] if system is not None else []
        messages += [{'role': 'user', 'content': PROBE_TEXT}, {'role': 'assistant', 'content': PROBE_TEXT}]
        template = self.template
        # an instance attribute shadows the template class's method for this rendering only
        no_system = (mock.patch.object(template, '_get_system', lambda inputs: None, create=True) if drop_system
                     else nullcontext())
        with no_system:
            return list(template.encode({'messages': messages, **extra})['input_ids'])

    def block(self, system: Optional[str], extra: Optional[Dict[str, Any]] = None) -> Tuple[int, Tuple[int, ...]]:
        """``(offset, ids)`` of the system turn the template renders for ``system`` (``None``: the template's
        default) and the row settings ``extra`` (``tools``, ``chat_template_kwargs``); ``ids`` is empty without one.
        Raises `SystemTurnNotFound` when the two renderings do not differ by one block."""
        extra = {k: v for k, v in (extra or {}).items() if v}
        key = json.dumps([system, extra], sort_keys=True, default=str)
        if key not in self._blocks:
            with_system, without = self._render(system, extra, False), self._render(system, extra, True)
            decode = self.template.tokenizer.decode
            blank = {t for t in set(with_system) if not decode([t]).strip()}
            span = inserted_span(with_system, without, blank)
            if span is None:
                raise SystemTurnNotFound(
                    f'the template {self.template.template_meta.template_type!r} renders the system message '
                    'somewhere other than one block of the conversation, so its positions cannot be told from the '
                    'text keys T')
            self._blocks[key] = (span.start, tuple(with_system[span.start:span.stop]))
        return self._blocks[key]

    def span(self, row: Dict[str, Any], input_ids: Sequence[int]) -> range:
        """The system turn's positions in ``input_ids``, the template's encoding of ``row``."""
        messages = row.get('messages') or []
        system = messages[0].get('content') if messages and messages[0].get('role') == 'system' else None
        offset, ids = self.block(system, {'tools': row.get('tools'),
                                          'chat_template_kwargs': row.get('chat_template_kwargs')})
        if not ids:
            return range(0)
        if tuple(input_ids[offset:offset + len(ids)]) != ids:
            raise SystemTurnNotFound(f'the encoding does not hold the {len(ids)}-token system turn the template '
                                     f'renders at position {offset}')
        return range(offset, offset + len(ids))

    def check(self) -> None:
        """At start: the system turn of an explicit system message, and of the template's default, can be located,
        and the explicit one holds the system text. Raises ValueError naming the fix."""
        meta = self.template.template_meta
        probe = f'{PROBE_TEXT} system message.'
        try:
            with _template_state(self.template):
                self.block(None)  # the template's default system (or none)
                if not getattr(meta, 'support_system', True):
                    return
                offset, ids = self.block(probe)
        except SystemTurnNotFound as error:
            raise ValueError(f'ddapo_attention cannot locate the system turn: {error}. The text keys T must leave '
                             'the system turn out (docs/notation.md); use a model family whose template renders '
                             f'it as one block ({", ".join(SUPPORTED_MODEL_TYPES)}).') from None
        if probe not in self.template.tokenizer.decode(list(ids)):
            raise ValueError(f'ddapo_attention cannot locate the system turn of template {meta.template_type!r}: '
                             'rendering it without the system message does not remove the system text (a jinja '
                             'chat template, --template_backend jinja?). The text keys T must leave the system '
                             "turn out (docs/notation.md); use ms-swift's own template backend (the default).")


def encode_completion(trainer, row: Dict[str, Any], system_turns: Optional[SystemTurns] = None) -> EncodedCompletion:
    """Encode the prompt with the trainer's template followed by exactly ``response_token_ids``.

    ms-swift's own `encode_sample` does what the training forward does (response ids injected, never
    re-tokenised text); the template then appends ``<|im_end|>\\n``, so ``o_i`` is the ``|o_i|``
    positions right after the prompt, the first labelled position. A thinking template's response prefix
    (``<think>`` and a newline, or an empty think block with thinking off) was prompt context during rollout:
    `encode_sample` puts it before the generated ids without a label, so it is part of ``q``. An empty
    completion encodes the prompt with an empty answer (``|o_i| = 0``). The batch stays on the CPU until its
    forward. ``system_turns`` locates the system turn (raises `SystemTurnNotFound`).
    """
    template = trainer.template
    sample = GRPOSample.from_row(row)
    ids = generated_ids(sample.response_token_ids)
    sample.response_token_ids = [ids] if ids else []  # the last turn alone, as it was generated
    if not ids and sample.messages and sample.messages[-1].get('role') == 'assistant':
        sample.messages[-1] = {**sample.messages[-1], 'content': ''}
    encoded = encode_sample(sample, template)
    encoded.pop('_extra_kwargs', None)
    input_ids, labels = list(encoded['input_ids']), list(encoded['labels'])
    prompt_len = next((i for i, label in enumerate(labels) if label != -100), len(labels))
    if input_ids[prompt_len:prompt_len + len(ids)] != ids:
        raise GeneratedIdsMismatch(f'encoded sequence does not hold the {len(ids)} generated ids at position '
                                   f'{prompt_len} (sequence length {len(input_ids)})')
    batch = template.data_collator([encoded])
    batch.pop('labels', None)
    batch['logits_to_keep'] = 1  # the reward reads attention only; skip the full-vocabulary head
    labelled = all(label != -100 for label in labels[prompt_len:prompt_len + len(ids)])
    system_turn = system_turns.span(row, input_ids[:prompt_len]) if system_turns is not None else range(0)
    return EncodedCompletion(input_ids, prompt_len, len(ids), batch, labelled, system_turn)


def padding_row(trainer) -> Dict[str, Any]:
    """A minimal row whose forward keeps a rank in step with the others (ZeRO-3 gathers in every forward;
    ms-swift runs the vision tower on a dummy image for text-only rows, so the same modules run)."""
    eos = trainer.template.tokenizer.convert_tokens_to_ids('<|im_end|>')
    return {'messages': [{'role': 'user', 'content': '.'}, {'role': 'assistant', 'content': ''}],
            'response_token_ids': [[eos]]}


def processed_images(trainer, row: Dict[str, Any], image_grid_thw: Optional[torch.Tensor]) -> List[Any]:
    """The row's images (PIL, path, or ``{'bytes', 'path'}`` as rows carry them) resized to the patch grid."""
    if image_grid_thw is None or not row.get('images'):
        return []
    patch = trainer.template.processor.image_processor.patch_size
    return [load_pil_img(image).convert('RGB').resize((int(w) * patch, int(h) * patch))
            for image, (_, h, w) in zip(row['images'], image_grid_thw.tolist())]


def last_user_turn(row: Dict[str, Any]) -> str:
    """The text of the row's last user message (the question), as the dataset has it."""
    users = [m for m in row.get('messages') or [] if m.get('role') == 'user']
    content = users[-1].get('content', '') if users else ''
    return content if isinstance(content, str) else str(content)


def image_paths(row: Dict[str, Any]) -> List[str]:
    """The row's images as paths (ms-swift carries a path, or ``{'bytes', 'path'}``); ``<in memory>`` without one."""
    paths = []
    for image in row.get('images') or []:
        path = image.get('path') if isinstance(image, dict) else image if isinstance(image, str) else None
        paths.append(path or '<in memory>')
    return paths


def tracker_runs(trainer) -> Dict[str, Any]:
    """The trackers this run reports to, found the way each integration exposes its run: TensorBoard's
    ``SummaryWriter`` on transformers' ``TensorBoardCallback`` (TensorBoard has no run of its own); ``wandb.run``, the
    active run that wandb's integration started; ``swanlab.get_run()``, the active run that swanlab's own
    ``SwanLabCallback`` (the one ms-swift registers) or transformers' started. A tracker whose package no integration
    imported is not looked for (nothing is imported here)."""
    import sys
    runs = {}
    callbacks = getattr(getattr(trainer, 'callback_handler', None), 'callbacks', [])
    writers = [getattr(c, 'tb_writer', None) for c in callbacks if type(c).__name__ == 'TensorBoardCallback']
    if any(w is not None for w in writers):
        runs['tensorboard'] = next(w for w in writers if w is not None)
    wandb = sys.modules.get('wandb')
    if wandb is not None and getattr(wandb, 'run', None) is not None:
        runs['wandb'] = wandb.run
    swanlab = sys.modules.get('swanlab')
    if swanlab is not None and hasattr(swanlab, 'get_run'):
        try:
            run = swanlab.get_run()
        except RuntimeError:  # no active run
            run = None
        if run is not None:
            runs['swanlab'] = run
    return runs


def log_pictures(trainer, step: int, pictures: Dict[str, str]) -> List[str]:
    """Hand the report's pictures (``{tag: PNG path}``, tags such as ``ddapo/train/sample0_image0``) to every tracker
    of `tracker_runs` through its own image API: ``SummaryWriter.add_image``, ``wandb.Image``, ``swanlab.Image``.
    Returns the trackers used."""
    import sys

    import numpy as np
    from PIL import Image
    used = []
    for name, run in tracker_runs(trainer).items():
        if name == 'tensorboard':
            for tag, path in pictures.items():
                run.add_image(tag, np.asarray(Image.open(path).convert('RGB')), step, dataformats='HWC')
            run.flush()
        elif name == 'wandb':
            wandb = sys.modules['wandb']
            # transformers' WandbCallback plots against train/global_step
            run.log({**{tag: wandb.Image(path) for tag, path in pictures.items()}, 'train/global_step': step})
        else:
            swanlab = sys.modules['swanlab']
            swanlab.log({tag: swanlab.Image(path) for tag, path in pictures.items()}, step=step)
        used.append(name)
    return used


def image_merge_size(trainer) -> int:
    """Patches merged into one vision token along each side (2 for every supported Qwen family)."""
    return int(trainer.template.processor.image_processor.merge_size)


@contextmanager
def _template_state(template) -> Iterator[None]:
    saved = (template.mode, template.max_length, template.padding_free)
    template.set_mode(TEMPLATE_MODE)
    template.max_length = None  # as the trainer's own encoding for the policy forward
    template.padding_free = False  # one sequence, batch size 1: nothing to pack
    try:
        yield
    finally:
        template.set_mode(saved[0])
        template.max_length, template.padding_free = saved[1:]


@contextmanager
def _eval_modes(model: torch.nn.Module) -> Iterator[None]:
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


@contextmanager
def _rng_state() -> Iterator[None]:
    """Python, numpy and torch (CPU and current CUDA device) RNG states as they were: no trace in dropout
    masks or sampling after the reward forward."""
    import numpy as np
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@dataclass
class ForwardReport:
    """What the one-time ``[DDAPO_DEBUG]`` report shows of the reward forward."""
    attention_before: Dict[str, Dict[str, Any]]
    attention_during: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    gradient_checkpointing: Optional[bool] = None


@contextmanager
def policy_forward(trainer, implementation: str = EAGER_ATTENTION) -> Iterator[Tuple[Any, ForwardReport]]:
    """Set the policy up for reward forwards; yields ``(forward, report)`` where ``forward(**kwargs)``
    moves the batch to the device and calls ``trainer.model`` (template hook included) under ``torch.no_grad()``.

    Inside: template in ``train`` mode without truncation or packing, every module in eval mode,
    gradient checkpointing off, language attention on ``implementation`` (``ddapo_eager`` or ``ddapo_rows``),
    RNG states forked. All of it is restored on exit, exceptions included.
    """
    model = trainer.model
    config = unwrap_policy(trainer).config
    keys = AttnImpl.attn_impl_keys
    report = ForwardReport(attention_before=attention_settings(config, keys),
                           gradient_checkpointing=getattr(model, 'is_gradient_checkpointing', None))
    with ExitStack() as stack:
        stack.enter_context(_rng_state())
        stack.enter_context(_template_state(trainer.template))
        stack.enter_context(_eval_modes(model))
        stack.enter_context(disable_gradient_checkpointing(model, trainer.args.gradient_checkpointing_kwargs))
        stack.enter_context(language_attention(config, keys, implementation))
        report.attention_during = attention_settings(config, keys)

        device = trainer.accelerator.device

        def forward(**kwargs):
            with torch.no_grad():
                return model(**to_device(kwargs, device))

        yield forward, report


def enable_token_weights(trainer) -> None:
    """Check at start that the trainer can take per-token advantage weights, and open its store.

    Needs the GRPO patch ``swift_patches/grpo_token_weights.py`` (or its diff) and a loss that reads the per-token
    advantages: ``--loss_type real`` and the Liger loss reduce them to one number per output (the weights would
    cancel), and sequence parallelism trains on outputs scored on other ranks.
    """
    from swift_patches import grpo_token_weights
    if not grpo_token_weights.is_applied():
        raise RuntimeError('DDAPO_TOKEN_WEIGHTS=1 needs the ms-swift patch that multiplies token weights into the '
                           'GRPO advantages, and it is not applied: load the reward through --external_plugins '
                           'examples/train/grpo/plugin/plugin.py, or apply '
                           'swift_patches/ms_swift_4.6_grpo_token_weights.diff to ms-swift.')
    args = trainer.args
    problems = []
    if getattr(trainer, 'loss_type', getattr(args, 'loss_type', None)) == 'real':
        problems.append('--loss_type real reduces the advantages to one per output')
    if getattr(args, 'use_liger_kernel', False):
        problems.append('--use_liger_kernel true reduces the advantages to one per output')
    if getattr(trainer.template, 'sequence_parallel_size', 1) > 1:
        problems.append('--sequence_parallel_size > 1 trains on outputs whose weights another rank computed')
    if problems:
        raise ValueError(f'DDAPO_TOKEN_WEIGHTS=1 cannot weight the GRPO loss of this run: {"; ".join(problems)}. '
                         'Unset DDAPO_TOKEN_WEIGHTS or change these arguments.')
    if getattr(trainer, grpo_token_weights.STORE, None) is None:
        setattr(trainer, grpo_token_weights.STORE, {})


def token_weight_store(trainer) -> Dict[str, List[float]]:
    """``{request_id: w_{i,t}}`` that the patched ``_postprocess_batch`` reads (and empties) after the rewards."""
    from swift_patches import grpo_token_weights
    store = getattr(trainer, grpo_token_weights.STORE, None)
    if store is None:
        raise RuntimeError('token weights are not enabled on this trainer (enable_token_weights was not called)')
    return store


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


def registered_reward(name: str, args=None):
    """The reward registered in ms-swift's ``orms`` as ``name``, built with the trainer's ``args`` (the reward whose
    verdict gates Eq. 9). Raises ValueError, at start, naming the registered ones."""
    from swift.rewards import orms
    if name not in orms:
        raise ValueError(f'DDAPO_GATE_REWARD={name!r} is not a registered reward; registered: {", ".join(sorted(orms))}')
    return orms[name](args=args)


def _forwards_are_collective(accelerator, template) -> bool:
    """Whether a forward of the policy is a collective of all ranks, so that every rank must run as many.

    ZeRO-3 and FSDP gather the sharded parameters in every forward, and sequence parallelism exchanges
    activations. Plain data parallelism (DDP, ZeRO-1/2) runs a no-grad forward on each rank alone: DDP syncs
    buffers only when gradients are on. Any other distributed type counts as collective, the safe side.
    """
    from accelerate.utils import DistributedType
    if accelerator.num_processes <= 1:
        return False
    if getattr(template, 'sequence_parallel_size', 1) > 1:
        return True
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return getattr(accelerator.state.deepspeed_plugin, 'zero_stage', 3) == 3
    data_parallel = {getattr(DistributedType, name) for name in ('NO', 'MULTI_CPU', 'MULTI_GPU', 'MULTI_NPU',
                                                                  'MULTI_XPU', 'MULTI_MLU', 'MULTI_SDAA', 'MULTI_MUSA',
                                                                  'MULTI_HPU') if hasattr(DistributedType, name)}
    return kind not in data_parallel


class SwiftTrainer:
    """The GRPO trainer as the reward sees it; built once, at start (``on_trainer_init``), which validates the
    policy model (`model_spec`) and locates the template's system turn (`SystemTurns.check`)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.spec = model_spec(trainer)
        self.system_turns = SystemTurns(trainer.template)
        self.system_turns.check()
        self.forwards_are_collective = _forwards_are_collective(trainer.accelerator, trainer.template)
        drift = version_drift()
        if drift:
            get_logger().warning(
                '[DDAPO] ddapo_swift.INTERNALS (the private ms-swift / transformers names the reward relies on) were '
                'checked against other versions: ' + ', '.join(f'{p} {c} (installed {i})' for p, (c, i) in
                                                              drift.items()) +
                '; python -m pytest tests/test_swift_adapter.py checks them on this install.')

    # where and when
    @property
    def rank(self) -> int:
        return self.trainer.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.trainer.accelerator.is_main_process

    @property
    def mode(self) -> str:
        """``train`` or ``eval``, the key of the trainer's metrics store."""
        return 'train' if self.trainer.model.training else 'eval'

    @property
    def step(self) -> int:
        """``global_step``: the rewards of step N are computed while it is still N - 1."""
        return int(getattr(getattr(self.trainer, 'state', None), 'global_step', 0) or 0)

    @property
    def logging_steps(self) -> int:
        return max(1, int(getattr(self.trainer.args, 'logging_steps', 1) or 1))

    @property
    def output_dir(self) -> str:
        return self.trainer.args.output_dir

    @property
    def rollout(self) -> str:
        """`rollout_engine` of the trainer's arguments."""
        return rollout_engine(self.trainer.args)

    # ranks
    def gather(self, values: List[Any]) -> List[Any]:
        """Every rank's ``values``, concatenated in rank order (one collective; every rank must call it)."""
        from accelerate.utils import gather_object
        return gather_object(values)

    # encoding and forwards
    def rows(self, kwargs: Dict[str, Any], num_completions: int) -> List[Dict[str, Any]]:
        return reward_rows(kwargs, num_completions)

    def encode(self, row: Dict[str, Any]) -> EncodedCompletion:
        """`encode_completion` with the system turn located; raises `NotEncodable`."""
        return encode_completion(self.trainer, row, self.system_turns)

    def padding_encoding(self) -> EncodedCompletion:
        return encode_completion(self.trainer, padding_row(self.trainer))

    def policy_forward(self, implementation: str):
        """`policy_forward`: yields ``(forward, report)``."""
        return policy_forward(self.trainer, implementation)

    def decode(self, ids: Sequence[int]) -> str:
        return self.trainer.template.tokenizer.decode(list(ids))

    # the report
    def images(self, row: Dict[str, Any], image_grid_thw: Optional[torch.Tensor]) -> List[Any]:
        return processed_images(self.trainer, row, image_grid_thw)

    question = staticmethod(last_user_turn)
    image_paths = staticmethod(image_paths)

    @property
    def merge_size(self) -> int:
        return image_merge_size(self.trainer)

    def log_pictures(self, step: int, pictures: Dict[str, str]) -> List[str]:
        return log_pictures(self.trainer, step, pictures)

    def log_metrics(self, mode: str, metrics: Dict[str, float]) -> None:
        """Append to the trainer's metrics store (``_metrics[mode][key]``, averaged at logging); a stand-in trainer
        without one (tests) logs nothing."""
        store = getattr(self.trainer, '_metrics', None)
        if store is not None:
            for key, value in metrics.items():
                if math.isfinite(value):  # the trainer averages lists at logging: a NaN would poison the mean
                    store[mode][key].append(value)

    # token weights (Eq. 10)
    def enable_token_weights(self) -> None:
        enable_token_weights(self.trainer)

    def hand_over_token_weights(self, rows: Sequence[Dict[str, Any]], weights: Sequence[Optional[List[float]]]) -> None:
        """Put each output's ``w_{i,t}`` where the patched GRPO trainer reads them: by ``request_id``."""
        if any(row.get('request_id') in (None, '') for row in rows):
            raise RuntimeError('DDAPO_TOKEN_WEIGHTS=1 hands token weights to the trainer by request_id, and the '
                               'reward kwargs have rows without one; run it under ms-swift GRPO.')
        store = token_weight_store(self.trainer)
        for row, output_weights in zip(rows, weights):
            if output_weights is not None:
                store[row['request_id']] = output_weights
