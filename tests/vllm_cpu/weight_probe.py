"""Test plugin (one more ``--external_plugins`` file): what vLLM samples with, around each colocate weight sync.

ms-swift's colocate sync (``_move_model_to_vllm``) loads the trainer's weights into the in-process vLLM model
(``trainer.engine.inner_model``). Around every sync this writes one JSON line to ``$VLLM_PROBE_OUT``: the global step,
vLLM's fused ``qkv_proj`` weight of the first softmax-attention decoder layer before and after the sync, and the
trainer's own q/k/v of that layer (LoRA merged in, as the sync does), so a test can show that the weights vLLM samples with change after an
optimiser step and equal the trainer's.
"""
import json
import os
import re

import torch
from swift.rlhf_trainers.rollout_mixin import RolloutTrainerMixin

OUT = os.environ['VLLM_PROBE_OUT']
QKV = re.compile(r'layers\.(\d+)\.self_attn\.qkv_proj\.weight$')  # a hybrid model's linear-attention layers have none


def _vllm_qkv(trainer):
    """(decoder layer, vLLM's fused q/k/v weight of the language model's first softmax-attention layer)."""
    found = sorted((int(QKV.search(name).group(1)), p) for name, p in trainer.engine.inner_model.named_parameters()
                   if QKV.search(name) and 'visual' not in name)
    assert found, [name for name, _ in trainer.engine.inner_model.named_parameters()][:40]
    return found[0][0], found[0][1].detach().float().clone()


def _trainer_qkv(trainer, layer: int) -> torch.Tensor:
    """The trainer's q, k, v of decoder layer ``layer``, with a LoRA adapter's delta added (what the sync merges)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    parts = []
    for name in ('q_proj', 'k_proj', 'v_proj'):
        module = next(m for n, m in model.named_modules()
                      if n.endswith(f'layers.{layer}.self_attn.{name}') and 'visual' not in n)
        weight = module.base_layer.weight if hasattr(module, 'base_layer') else module.weight
        delta = module.get_delta_weight('default') if hasattr(module, 'get_delta_weight') else 0
        parts.append((weight + delta).detach().float())
    return torch.cat(parts)


_original = RolloutTrainerMixin._move_model_to_vllm


def _move_model_to_vllm(self, *args, **kwargs):
    _, before = _vllm_qkv(self)
    result = _original(self, *args, **kwargs)
    layer, after = _vllm_qkv(self)
    trainer = _trainer_qkv(self, layer)
    with open(OUT, 'a') as f:
        f.write(json.dumps({'step': int(self.state.global_step), 'layer': layer,
                            'changed': float((after - before).abs().max()),
                            'vllm_vs_trainer': float((after - trainer).abs().max()),
                            'before_vs_trainer': float((before - trainer).abs().max())}) + '\n')
    return result


RolloutTrainerMixin._move_model_to_vllm = _move_model_to_vllm
