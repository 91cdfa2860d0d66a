"""The policy model as the reward needs it: vision token ids, special ids, and the attention layers ``L_att`` read
from the config's layer types; the family check."""
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Sequence, Tuple

import torch

from ddapo.ms_swift.attention import language_config
from ddapo.ms_swift.compat import SUPPORTED_MODEL_TYPES

# L_att, one rule for every family: the decoder layers whose `layer_types` entry (transformers' per-layer type list)
# is this, or every decoder layer when the config has no `layer_types`. Left out: linear attention (Qwen3.5's Gated
# DeltaNet: no probabilities to read) and sliding-window attention (Gemma 3: the window hides the image from tokens
# far after it).
FULL_ATTENTION = 'full_attention'


@dataclass(frozen=True)
class ModelSpec:
    """What the reward needs to know of the policy model and its tokenizer."""
    vision_token_ids: FrozenSet[int]  # image_token_id, video_token_id of the model config
    image_token_id: Optional[int]
    special_ids: FrozenSet[int]
    num_layers: int  # L, the language model's decoder layers
    attention_layers: Tuple[int, ...] = ()  # L_att: 0-based decoder-layer indices of the full-attention layers
    model_type: str = ''
    layer_types: Tuple[str, ...] = ()  # the language config's layer_types; empty when it has none

    @property
    def hybrid(self) -> bool:
        """Some decoder layers are not full attention (linear attention mixes the whole sequence recurrently, a sliding
        window counts positions): outputs of one prompt cannot share a forward."""
        return len(self.attention_layers) < self.num_layers

    @property
    def layer_rule(self) -> str:
        """How ``L_att`` was chosen, for the start log."""
        if not self.layer_types:
            return 'every decoder layer: the config has no layer_types'
        left_out = sorted({kind for kind in self.layer_types if kind != FULL_ATTENTION})
        return f"the layers of type '{FULL_ATTENTION}' in layer_types" + (
            f" ({', '.join(left_out)} left out)" if left_out else '')

    def decoder_layers(self, slots: Sequence[int]) -> List[int]:
        """Decoder-layer indices (0-based ``layer_idx``) of positions ``slots`` in ``L_att``."""
        return [self.attention_layers[i] for i in slots]


def attention_layers(config) -> Tuple[int, ...]:
    """``L_att``: the decoder layers whose ``layer_types`` entry (the language config's per-layer type list) is
    ``full_attention``; every decoder layer when the config has none.

    Example: Qwen3.5's ``['linear_attention', 'linear_attention', 'linear_attention', 'full_attention', ...]``
    gives ``(3, 7, ...)``, Gemma 3's five ``sliding_attention`` layers for each ``full_attention`` one give
    ``(5, 11, ...)``; Qwen2.5-VL's all-``full_attention`` list, and GLM's language config without one, give every
    layer.
    """
    text = language_config(config)
    num_layers = int(getattr(text, 'num_hidden_layers', 0) or 0)
    layer_types = getattr(text, 'layer_types', None) or [FULL_ATTENTION] * num_layers
    return tuple(i for i, kind in enumerate(layer_types[:num_layers]) if kind == FULL_ATTENTION)


def unwrap_policy(trainer) -> torch.nn.Module:
    """The Hugging Face model that really runs: DeepSpeed / DDP unwrapped by accelerate, then PEFT."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.get_base_model() if hasattr(model, 'get_base_model') else model


def model_spec(trainer) -> ModelSpec:
    """Read and validate the policy's vision token ids, special tokens and attention layers ``L_att``.

    Raises ValueError, at start, when the model config has no image/video token id (not a vision-language
    model), when its family is not one of `SUPPORTED_MODEL_TYPES` (`ddapo.ms_swift.families`), or when its language
    model has no full-attention layer (nothing to read attention from).
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
        raise ValueError(f'ddapo_attention reads the attention of the full-attention layers, and the language model '
                         f'of {type(model).__name__} has none (layer types {kinds}; L_att is the layers of type '
                         f'{FULL_ATTENTION!r}): there is no alpha to read. Drop the reward for this model.')
    return ModelSpec(
        vision_token_ids=frozenset(vision_ids),
        image_token_id=getattr(config, 'image_token_id', None),
        special_ids=frozenset(special),
        num_layers=int(num_layers),
        attention_layers=layers,
        model_type=config.model_type,
        layer_types=tuple(getattr(language_config(config), 'layer_types', None) or ()),
    )
