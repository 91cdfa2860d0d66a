"""Attention capture inside the language model's attention computation.

ms-swift's template pre-forward hook rebuilds the forward kwargs from a fixed key list, so
``output_attentions=True`` never reaches the model. Instead, this module registers an attention
implementation, ``ddapo_eager``, with transformers' ``AttentionInterface``: it calls the modeling
file's own ``eager_attention_forward`` (the eager numbers, bit for bit) and reduces each layer's
``[H, S, S]`` probabilities to the Eq. (1) sums of the generated rows (`layer_modality_masses`) as
soon as the layer has computed them, so no layer's map outlives its layer.

transformers reads ``text_config._attn_implementation`` at every forward, and the vision tower reads
its own ``vision_config``: switching the text config switches the language model alone, so only
its layers are captured.
"""
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from ddapo_formulas import head_average, layer_key_attention, layer_modality_masses
from ddapo_key_sets import KeySets

ATTENTION_NAME = 'ddapo_eager'


class LayerCapture:
    """Collects, for one sequence during one forward (batch size 1), per language-model layer: the Eq. (1)
    sums ``masses [L, |o_i|, 2]`` and the per-key attention ``key_attention [L, S]`` (`layer_key_attention`)."""

    def __init__(self, key_sets: KeySets, query_start: int, num_queries: int, num_layers: int):
        self.key_sets = key_sets
        self.rows = slice(query_start, query_start + num_queries)  # 0-based rows s_{i,t} - 1
        self.masses = torch.full((num_layers, num_queries, 2), torch.nan, dtype=torch.float32)
        self.key_attention = torch.zeros((num_layers, key_sets.text_keys.numel()), dtype=torch.float32)
        self.captured: List[int] = []

    def record(self, layer_idx: int, attention: torch.Tensor) -> None:
        """``attention``: ``[1, H, S, S]`` eager probabilities of layer ``layer_idx``."""
        if attention.shape[0] != 1:
            raise RuntimeError(f'LayerCapture expects batch size 1, got attention of shape {tuple(attention.shape)}')
        text_keys = self.key_sets.text_keys.to(attention.device)
        vision_keys = self.key_sets.vision_keys.to(attention.device)
        head_mean = head_average(attention[0, :, self.rows, :])
        self.masses[layer_idx] = layer_modality_masses(head_mean, text_keys, vision_keys).cpu()
        self.key_attention[layer_idx] = layer_key_attention(head_mean, text_keys, vision_keys).cpu()
        self.captured.append(layer_idx)


_ACTIVE: ContextVar[Optional[LayerCapture]] = ContextVar('ddapo_active_capture', default=None)
_EAGER_BY_MODULE: Dict[str, Any] = {}


def _eager_attention_of(module: torch.nn.Module):
    """The ``eager_attention_forward`` of the modeling file that defines ``module``."""
    name = type(module).__module__
    if name not in _EAGER_BY_MODULE:
        eager = getattr(sys.modules[name], 'eager_attention_forward', None)
        if eager is None:
            raise RuntimeError(f'{name} defines no eager_attention_forward; DDAPO cannot read its attention')
        _EAGER_BY_MODULE[name] = eager
    return _EAGER_BY_MODULE[name]


def ddapo_eager_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], **kwargs):
    """Eager attention that also hands the layer's probabilities to the active `LayerCapture`."""
    attn_output, attn_weights = _eager_attention_of(module)(module, query, key, value, attention_mask, **kwargs)
    capture = _ACTIVE.get()
    if capture is not None:
        capture.record(module.layer_idx, attn_weights)
    return attn_output, attn_weights


def register_attention() -> None:
    """Register ``ddapo_eager`` and its mask (the eager mask) with transformers; idempotent."""
    AttentionInterface.register(ATTENTION_NAME, ddapo_eager_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS['eager'])


@contextmanager
def capturing(capture: LayerCapture) -> Iterator[LayerCapture]:
    """Route the ``ddapo_eager`` layers of forwards run inside this block to ``capture``."""
    token = _ACTIVE.set(capture)
    try:
        yield capture
    finally:
        _ACTIVE.reset(token)


def language_config(config) -> Any:
    """The config the language model's attention reads: ``text_config`` when there is one."""
    return getattr(config, 'text_config', None) or config


def attention_settings(config, keys: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """The attention-implementation keys present on ``config`` and its ``text_config`` (for logs)."""
    found = {}
    for label, cfg in (('config', config), ('text_config', getattr(config, 'text_config', None))):
        if cfg is not None:
            found[label] = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
    return found


@contextmanager
def language_attention(config, keys: Sequence[str], implementation: str = ATTENTION_NAME) -> Iterator[None]:
    """Switch the language model's attention to ``implementation`` for the block.

    Every key of ``keys`` present on ``config`` and ``text_config`` is saved and restored on exit,
    exceptions included; only the language config's ``_attn_implementation`` is switched (setting it
    on the top-level config would cascade into the vision tower).
    """
    configs = [c for c in (config, getattr(config, 'text_config', None)) if c is not None]
    saved = [(cfg, k, getattr(cfg, k)) for cfg in configs for k in keys if hasattr(cfg, k)]
    register_attention()
    try:
        language_config(config)._attn_implementation = implementation
        yield
    finally:
        # Only what changed is written back, top-level config first: its `_attn_implementation` setter
        # cascades into every sub-config (the vision tower's too), so an unneeded write would not be harmless.
        for cfg, key, value in saved:
            if getattr(cfg, key) != value:
                setattr(cfg, key, value)
