"""Everything the DDAPO reward needs from ms-swift, in one place.

    reward kwargs row --encode_completion--> the trainer's template encoding of [q ; o_i], exact
                                             generated ids, prompt_len P, collated forward kwargs
    trainer           --policy_forward-----> no-grad eval forwards of the policy model with the
                                             language model's attention on a DDAPO implementation
                                             (ddapo_capture), every piece of state it touches restored on exit
    token weights     --token_weight_store-> trainer.token_advantage_weights[request_id], which the GRPO
                                             patch swift_patches/grpo_token_weights.py multiplies into the
                                             per-token advantages
"""
import random
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch
from swift.model.utils import AttnImpl
from swift.rl_core.data import GRPOSample
from swift.rlhf_trainers.utils import encode_sample, load_pil_img
from swift.trainers.utils import disable_gradient_checkpointing
from swift.utils import to_device

from ddapo_capture import EAGER_ATTENTION, attention_settings, language_attention, language_config

TEMPLATE_MODE = 'train'  # the mode ms-swift's GRPO encodes and forwards in (swift/pipelines/train/rlhf.py)
NOT_ROW_KWARGS = frozenset({'trainer', 'trainer_state'})


@dataclass(frozen=True)
class ModelSpec:
    """What the reward needs to know of the policy model and its tokenizer."""
    vision_token_ids: FrozenSet[int]  # image_token_id, video_token_id of the model config
    image_token_id: Optional[int]
    special_ids: FrozenSet[int]
    im_start_id: int
    im_end_id: int
    system_role_ids: Tuple[int, ...]
    num_layers: int  # L, the language model's decoder layers


def unwrap_policy(trainer) -> torch.nn.Module:
    """The Hugging Face model that really runs: DeepSpeed / DDP unwrapped by accelerate, then PEFT."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.get_base_model() if hasattr(model, 'get_base_model') else model


def model_spec(trainer) -> ModelSpec:
    """Read and validate the policy's vision token ids, special tokens and layer count.

    Raises ValueError when the model config has no image/video token id (not a vision-language model).
    """
    model = unwrap_policy(trainer)
    config = model.config
    vision_ids = {getattr(config, k, None) for k in ('image_token_id', 'video_token_id')} - {None}
    if not vision_ids:
        raise ValueError(f'ddapo_attention needs a vision-language model: the config of {type(model).__name__} '
                         f'(model_type={config.model_type!r}) has no image_token_id or video_token_id, so the '
                         "prompt's vision keys V cannot be found. Use Qwen2-VL or Qwen2.5-VL, or drop the reward.")
    tokenizer = trainer.template.tokenizer
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    num_layers = getattr(language_config(config), 'num_hidden_layers', None)
    if not num_layers:
        raise ValueError(f'ddapo_attention cannot find num_hidden_layers on the language config of {type(model).__name__}')
    return ModelSpec(
        vision_token_ids=frozenset(vision_ids),
        image_token_id=getattr(config, 'image_token_id', None),
        special_ids=frozenset(special),
        im_start_id=tokenizer.convert_tokens_to_ids('<|im_start|>'),
        im_end_id=tokenizer.convert_tokens_to_ids('<|im_end|>'),
        system_role_ids=tuple(tokenizer.encode('system', add_special_tokens=False)),
        num_layers=int(num_layers),
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


class GeneratedIdsMismatch(ValueError):
    """The template's encoding does not hold the generated ids right after the prompt."""


def encode_completion(trainer, row: Dict[str, Any]) -> EncodedCompletion:
    """Encode the prompt with the trainer's template followed by exactly ``response_token_ids``.

    ms-swift's own `encode_sample` does what the training forward does (response ids injected, never
    re-tokenised text); the template then appends ``<|im_end|>\\n``, so ``o_i`` is the ``|o_i|``
    positions right after the prompt, the first labelled position. An empty completion encodes the
    prompt with an empty answer (``|o_i| = 0``). The batch stays on the CPU until its forward.
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
    return EncodedCompletion(input_ids, prompt_len, len(ids), batch, labelled)


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


def image_merge_size(trainer) -> int:
    """Patches merged into one vision token along each side (2 for Qwen2-VL / Qwen2.5-VL)."""
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
