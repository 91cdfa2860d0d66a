"""The transformers side of the capture: the attention functions registered with transformers'
``AttentionInterface`` (and their masks with ``AttentionMaskInterface``), and the switch of the language model's
attention to them. Each function computes the layer's output as transformers does and hands the probabilities of the
captured rows to the engine (`ddapo.engine.capture`):

- ``ddapo_eager`` and ``ddapo_rows``: the reward's own forward (``DDAPO_FORWARD=own``);
- ``ddapo_over_<implementation>`` (`wrapped_attention`): inside ms-swift's old log-prob forward
  (``DDAPO_FORWARD=old_logps``), the trainer's own implementation (sdpa, eager, flash attention) for the layer's
  output, unchanged, and the eager formula for the captured rows (the eager map itself when the trainer runs eager);
  a failure of the recording marks the capture failed and never reaches the trainer's forward.

transformers reads ``text_config._attn_implementation`` at every forward, and the vision tower reads its own
``vision_config``: switching the text config switches the language model alone, so only its layers are captured.
"""
import sys
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Sequence

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from ddapo.engine.capture import EAGER_ATTENTION, ROWS_ATTENTION, fail_active, record_probabilities, record_rows

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
    """Eager attention that also hands the captured rows of the layer's probabilities to the active captures."""
    attn_output, attn_weights = _eager_attention_of(module)(module, query, key, value, attention_mask, **kwargs)
    record_probabilities(module.layer_idx, attn_weights, key.shape[2], query.shape[2])
    return attn_output, attn_weights


def ddapo_rows_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], **kwargs):
    """sdpa for the layer's output; the eager formula for the captured rows only (`record_rows`)."""
    attn_output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    record_rows(module.layer_idx, query, key, attention_mask, kwargs.get('scaling') or query.shape[-1] ** -0.5,
                getattr(module, 'num_key_value_groups', 1))
    return attn_output, None


WRAPPED_PREFIX = 'ddapo_over_'
# The trainer's implementations the old log-prob capture can wrap: their masks are tensors or None (a flex
# attention BlockMask is neither), so the eager formula can be evaluated for the captured rows.
WRAPPABLE = ('sdpa', 'eager', 'flash_attention_2', 'flash_attention_3')


def wrapped_attention(original: str) -> str:
    """Register ``ddapo_over_<original>``: the trainer's ``original`` implementation for the layer's output, unchanged,
    and its probabilities of the captured rows handed to the active captures; its mask function is ``original``'s.
    Returns the name (the name keeps ``original`` in it, for transformers' checks by substring such as ``flash``).

    The recording never raises into the trainer's forward: any exception in it marks the active `ForwardCapture`
    failed (``failure``, the error text; the capture is then not ``complete``, and the later layers record nothing)
    and the layer's output is returned as ``original`` computed it. An exception of ``original`` itself is the
    trainer's and propagates."""
    if original not in WRAPPABLE:
        raise ValueError(f'the old log-prob capture wraps {", ".join(WRAPPABLE)}, not {original!r}')
    name = WRAPPED_PREFIX + original

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], **kwargs):
        if original == 'eager':  # the modeling file's own eager: its map is the reference itself
            attn_output, attn_weights = _eager_attention_of(module)(module, query, key, value, attention_mask,
                                                                    **kwargs)
            try:
                record_probabilities(module.layer_idx, attn_weights, key.shape[2], query.shape[2])
            except Exception as error:  # inside the trainer's forward: the capture fails, the forward goes on
                fail_active(module.layer_idx, error)
            return attn_output, attn_weights
        with implementation_named(module, original):
            attn_output, attn_weights = ALL_ATTENTION_FUNCTIONS[original](module, query, key, value, attention_mask,
                                                                          **kwargs)
        try:
            record_rows(module.layer_idx, query, key, attention_mask,
                        kwargs.get('scaling') or query.shape[-1] ** -0.5, getattr(module, 'num_key_value_groups', 1))
        except Exception as error:  # inside the trainer's forward: the capture fails, the forward goes on
            fail_active(module.layer_idx, error)
        return attn_output, attn_weights

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


@contextmanager
def implementation_named(module: torch.nn.Module, original: str) -> Iterator[None]:
    """The layer's config names ``original`` while ``original`` runs: transformers' flash attention passes
    ``module.config._attn_implementation`` to its kernel loader, which knows ``flash_attention_2/3`` by exact name and
    would look ``ddapo_over_flash_attention_2`` up as a hub kernel (ValueError in the trainer's forward). Only the
    attribute's value changes, and it is back before the recording."""
    config = getattr(module, 'config', None)
    switched = getattr(config, '_attn_implementation', original)
    if config is None or switched == original:
        yield
        return
    config._attn_implementation = original
    try:
        yield
    finally:
        config._attn_implementation = switched


def register_attention() -> None:
    """Register ``ddapo_eager`` (with the eager mask) and ``ddapo_rows`` (with the sdpa mask); idempotent."""
    AttentionInterface.register(EAGER_ATTENTION, ddapo_eager_attention)
    AttentionMaskInterface.register(EAGER_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS['eager'])
    AttentionInterface.register(ROWS_ATTENTION, ddapo_rows_attention)
    AttentionMaskInterface.register(ROWS_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS['sdpa'])


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
def language_attention(config, keys: Sequence[str], implementation: str = EAGER_ATTENTION) -> Iterator[None]:
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
