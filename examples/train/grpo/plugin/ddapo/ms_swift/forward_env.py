"""The forward environment: no-grad eval forwards of the policy model with the language model's attention on a DDAPO
implementation, every piece of state they touch restored on exit; and whether a forward is a collective of all
ranks."""
import random
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from swift.model.utils import AttnImpl
from swift.trainers.utils import disable_gradient_checkpointing
from swift.utils import to_device

from ddapo.ms_swift.attention import EAGER_ATTENTION, attention_settings, language_attention
from ddapo.ms_swift.encoding import template_state
from ddapo.ms_swift.model_spec import unwrap_policy


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
class PolicyForwards:
    """The engine's forward environment (`ddapo.engine.scheduler.ForwardEnvironment`) on the trainer: ``forward`` from
    `policy_forward`, the adapter's ``gather`` and ``padding_encoding``, and whether forwards are collective."""
    forward: Callable[..., Any]
    gather: Callable[[List[Any]], List[Any]]
    padding_encoding: Callable[[], Any]
    collective: bool


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
        stack.enter_context(template_state(trainer.template))
        stack.enter_context(_eval_modes(model))
        stack.enter_context(disable_gradient_checkpointing(model, trainer.args.gradient_checkpointing_kwargs))
        stack.enter_context(language_attention(config, keys, implementation))
        report.attention_during = attention_settings(config, keys)

        device = trainer.accelerator.device

        def forward(**kwargs):
            with torch.no_grad():
                return model(**to_device(kwargs, device))

        yield forward, report


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
