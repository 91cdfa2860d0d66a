"""Everything the DDAPO reward needs from ms-swift, in one place, and the model-family specifics.

    policy model      --model_spec---------> vision token ids, special ids, the attention layers L_att read from
                                             the config's layer types (softmax attention only), family check
    trainer template  --SystemTurns--------> where the template renders the system turn (default system included)
    reward kwargs row --encode_completion--> the trainer's template encoding of [q ; o_i], exact
                                             generated ids, prompt_len P, the system turn, collated forward kwargs
    trainer           --policy_forward-----> no-grad eval forwards of the policy model with the
                                             language model's attention on a DDAPO implementation
                                             (ddapo_capture), every piece of state it touches restored on exit
    token weights     --token_weight_store-> trainer.token_advantage_weights[request_id], which the GRPO
                                             patch swift_patches/grpo_token_weights.py multiplies into the
                                             per-token advantages
"""
import json
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
from swift.utils import to_device

from ddapo_capture import EAGER_ATTENTION, attention_settings, language_attention, language_config
from ddapo_key_sets import inserted_span

TEMPLATE_MODE = 'train'  # the mode ms-swift's GRPO encodes and forwards in (swift/pipelines/train/rlhf.py)
NOT_ROW_KWARGS = frozenset({'trainer', 'trainer_state'})
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


VLLM_REFUSAL = ('ddapo_attention reads attention from its own forward of the policy model, and a vLLM rollout engine '
                'returns no attention to pair it with: run GRPO with --use_vllm false (the Transformers rollout).')


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
    """The last value of ``--name VALUE`` or ``--name=VALUE`` in a command line (later flags win, as in ms-swift)."""
    value = None
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(name + '='):
            value = word.split('=', 1)[1]
    return value


def check_command_line(argv: Sequence[str]) -> None:
    """Refuse, when ms-swift imports the plugin (before it builds a trainer or a rollout engine), a command line
    that runs ``ddapo_attention`` with a vLLM rollout. Raises ValueError.

    >>> check_command_line(['rlhf', '--reward_funcs', 'ddapo_attention', '--use_vllm', 'false'])
    >>> check_command_line(['rlhf', '--use_vllm', 'true', '--reward_funcs', 'accuracy'])  # not this reward's run
    """
    use_vllm = _flag_value(argv, '--use_vllm')
    if use_vllm is None or use_vllm.lower() in ('false', '0', 'no'):
        return
    start = next((i for i, word in enumerate(argv) if word == '--reward_funcs'), None)
    funcs = []
    if start is not None:
        for word in argv[start + 1:]:
            if word.startswith('--'):
                break
            funcs.append(word)
    if 'ddapo_attention' in funcs:
        raise ValueError(f'--use_vllm {use_vllm}: {VLLM_REFUSAL}')


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
    """Split ms-swift's batched reward kwargs (one list per column) back into per-sample rows."""
    columns = {k: v for k, v in kwargs.items()
               if k not in NOT_ROW_KWARGS and isinstance(v, (list, tuple)) and len(v) == num_completions}
    return [{k: v[i] for k, v in columns.items()} for i in range(num_completions)]


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


class GeneratedIdsMismatch(ValueError):
    """The template's encoding does not hold the generated ids right after the prompt."""


class SystemTurnNotFound(ValueError):
    """The template's encoding of a row does not hold its system turn where the template renders it."""


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


def log_pictures(trainer, step: int, pictures: Sequence[str], mode: str = 'train') -> List[str]:
    """Hand the report's pictures (PNG paths) to the trainer's trackers through their own callbacks and image APIs:
    TensorBoard's ``SummaryWriter.add_image``, ``wandb.Image``, ``swanlab.Image`` (whichever ``--report_to`` set up).
    Tags are ``ddapo/<mode>/<sample>_<picture>`` (e.g. ``ddapo/train/sample0_image0``). Returns the trackers used."""
    import numpy as np
    from PIL import Image
    from transformers.integrations import TensorBoardCallback, WandbCallback
    from transformers.integrations.integration_utils import SwanLabCallback
    # step0000002_train_sample0_image0.png -> ddapo/train/sample0_image0
    tagged = {f'ddapo/{mode}/' + os.path.splitext(os.path.basename(path))[0].split(f'_{mode}_', 1)[-1]: path
              for path in pictures}
    used = []
    for callback in getattr(getattr(trainer, 'callback_handler', None), 'callbacks', []):
        if isinstance(callback, TensorBoardCallback) and getattr(callback, 'tb_writer', None) is not None:
            for tag, path in tagged.items():
                callback.tb_writer.add_image(tag, np.asarray(Image.open(path).convert('RGB')), step, dataformats='HWC')
            callback.tb_writer.flush()
            used.append('tensorboard')
        elif isinstance(callback, WandbCallback) and getattr(callback, '_initialized', False):
            callback._wandb.log({**{tag: callback._wandb.Image(path) for tag, path in tagged.items()},
                                 'train/global_step': step})
            used.append('wandb')
        elif isinstance(callback, SwanLabCallback) and getattr(callback, '_initialized', False):
            callback._swanlab.log({tag: callback._swanlab.Image(path) for tag, path in tagged.items()}, step=step)
            used.append('swanlab')
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
