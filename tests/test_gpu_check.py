"""examples/train/grpo/gpu_check.py: its logic on the CPU (--cpu smoke: three real swift rlhf runs and the table), the
GPU run's command and model size, and its verdicts. The GPU figures themselves need a GPU (docs/benchmark.md)."""
import argparse
import math
import os
import subprocess
import sys

import pytest

import gpu_check
from conftest import GRPO_DIR

SCRIPT = os.path.join(GRPO_DIR, 'gpu_check.py')


@pytest.mark.slow
class TestCpuSmoke:
    """The whole script on the CPU: the three arms finish (no attention reward; DDAPO_FORWARD=own; old_logps), the
    table has every row, the rewards are finite and vary, and only the own arm's reward calls take a forward."""

    def test_smoke(self, tmp_path):
        env = {k: v for k, v in os.environ.items() if not k.startswith('DDAPO_')}
        result = subprocess.run([sys.executable, SCRIPT, '--cpu', '--steps', '2', '--output-dir', str(tmp_path)],
                                capture_output=True, text=True, env=env, timeout=600)
        out = result.stdout
        assert result.returncode == 0, (out + result.stderr)[-5000:]
        assert 'GPU check on CPU (' in out and 'cores), tiny model' in out
        for row in ('| step time, median of steps 2.. (s) |', '| ddapo_attention call, median (s) | - |',
                    '| reward cost: call + _prepare_batch_inputs over the arm without (s) | - |',
                    '| _prepare_batch_inputs (old log-prob forward), median (s) |',
                    '| peak GPU memory allocated (GiB) | n/a | n/a | n/a |',
                    '| rewards/DDAPOAttentionORM/mean per step |'):
            assert row in out, out
        assert 'hf own: rewards finite and varying' in out and 'hf old_logps: rewards finite and varying' in out
        for arm in ('own', 'old_logps'):
            assert (tmp_path / arm / 'reward_times.jsonl').read_text().count('\n') == 2  # one timed call per step
        assert not (tmp_path / 'without' / 'reward_times.jsonl').exists()
        assert 'attention read: old_logps (DDAPO_FORWARD=old_logps)' in (tmp_path / 'old_logps' / 'run.log').read_text()
        assert 'attention read: own (DDAPO_FORWARD=own)' in (tmp_path / 'own' / 'run.log').read_text()


class TestGpuRun:
    """The GPU run as composed (no GPU needed): bf16, LoRA without dropout, sdpa, ZeRO-3 on one process, 8 x 384, HF
    rollouts, the timing plugin after the reward's; the random model has Qwen2.5-VL-3B's size; the medium CPU model's
    sizes are consistent."""

    def test_command(self, tmp_path):
        args = argparse.Namespace(cpu=False, model_type='qwen2_5_vl', steps=4, num_generations=8, completion_length=384)
        inputs = {'model': 'm', 'dataset': 'd', 'timing_plugin': 'timing.py'}
        cmd = gpu_check.command(inputs, args, ['ddapo_attention', 'format'], str(tmp_path))
        text = ' '.join(cmd)
        for part in ('--torch_dtype bfloat16', '--tuner_type lora', '--lora_dropout 0', '--attn_impl sdpa',
                     '--deepspeed zero3', '--use_vllm false', '--num_generations 8', '--max_completion_length 384',
                     f'--external_plugins {gpu_check.PLUGIN} timing.py', '--reward_funcs ddapo_attention format'):
            assert part in text, text
        text = ' '.join(gpu_check.command(inputs, args, ['format'], str(tmp_path), rollout='vllm'))
        for part in ('--use_vllm true --vllm_mode colocate', '--sleep_level 1', '--deepspeed zero3'):
            assert part in text, text

    def test_model_size(self):
        import torch
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        text = dict(gpu_check.QWEN2_5_VL_3B_TEXT, tie_word_embeddings=True)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=gpu_check.QWEN2_5_VL_3B_VISION,
                                  tie_word_embeddings=True)
        with torch.device('meta'):
            model = Qwen2_5_VLForConditionalGeneration(config)
        assert 3.6e9 < sum(p.numel() for p in model.parameters()) < 3.9e9  # Qwen2.5-VL-3B: 3.75B
        medium = gpu_check.MEDIUM_TEXT
        head_dim = medium['hidden_size'] // medium['num_attention_heads']
        assert sum(medium['rope_parameters']['mrope_section']) * 2 == head_dim  # M-RoPE covers the head
        assert gpu_check.MEDIUM_VISION['out_hidden_size'] == medium['hidden_size']


class TestVerdicts:
    """Edge cases: constant rewards fail, non-finite rewards fail; the reward's cost is its call plus what it adds to
    _prepare_batch_inputs (where the old_logps capture runs) against the arm without it; the targets (own 10%,
    old_logps 2% of a step) are stated on a GPU only, against the vLLM step when the vLLM arms ran."""

    @staticmethod
    def arm(rewards, stds, steps=(9.0, 2.0, 2.0), reward_times=(1.0, 0.1, 0.1), prepare_times=(0.5, 0.3, 0.3)):
        return {'rewards': rewards, 'reward_stds': stds, 'step_times': list(steps), 'reward_times': list(reward_times),
                'prepare_times': list(prepare_times), 'peak': None, 'lengths': [8.0, 8.0, 8.0]}

    def runs(self, rewards, stds, **own_arm):
        return {('hf', 'without'): self.arm([], [], steps=(9.0, 1.9, 1.9), reward_times=()),
                ('hf', 'own'): self.arm(rewards, stds, **own_arm),
                ('hf', 'old_logps'): self.arm(rewards, stds, steps=(9.0, 1.95, 1.95), reward_times=(0.2, 0.01, 0.01),
                                              prepare_times=(0.5, 0.32, 0.32))}

    def test_varying(self):
        failures, notes = gpu_check.verdicts(self.runs([0.4, 0.45], [0.02, 0.03]), gpu=True)
        assert not failures
        assert 'ddapo_attention (own) costs 5.0% of the hf GRPO step: within the 10% target' in notes
        assert 'ddapo_attention (old_logps) costs 1.5% of the hf GRPO step: within the 2% target' in notes

    def test_constant_and_non_finite(self):
        assert 'do not vary' in gpu_check.verdicts(self.runs([0.5, 0.5], [0.0, 0.0]), gpu=False)[0][0]
        assert 'not finite' in gpu_check.verdicts(self.runs([0.5, math.nan], [0.1, 0.1]), gpu=False)[0][0]
        assert not any('target' in note for note in gpu_check.verdicts(self.runs([0.4, 0.5], [0.1, 0.1]),
                                                                       gpu=False)[1])

    def test_above_target(self):
        _, notes = gpu_check.verdicts(self.runs([0.4, 0.5], [0.1, 0.1], reward_times=(1, 0.5, 0.5)), gpu=True)
        assert 'ddapo_attention (own) costs 25.0% of the hf GRPO step: ABOVE the 10% target' in notes

    def test_vllm_step_is_the_target(self):
        """With fast rollouts the same reward is a larger share of a shorter step."""
        runs = self.runs([0.4, 0.5], [0.1, 0.1])
        runs[('vllm', 'without')] = self.arm([], [], steps=(5.0, 0.6, 0.6), reward_times=(),
                                             prepare_times=(0.2, 0.1, 0.1))
        runs[('vllm', 'own')] = self.arm([0.4, 0.5], [0.1, 0.1], steps=(5.0, 0.7, 0.7), prepare_times=(0.2, 0.1, 0.1))
        runs[('vllm', 'old_logps')] = self.arm([0.4, 0.5], [0.1, 0.1], steps=(5.0, 0.61, 0.61),
                                               reward_times=(0.2, 0.005, 0.005), prepare_times=(0.2, 0.105, 0.105))
        failures, notes = gpu_check.verdicts(runs, gpu=True)
        assert not failures and 'ddapo_attention (own) costs 14.3% of the vllm GRPO step: ABOVE the 10% target' in notes
        assert 'ddapo_attention (old_logps) costs 1.6% of the vllm GRPO step: within the 2% target' in notes
        text = '\n'.join(gpu_check.table('GPU', runs))
        assert ('| measure | HF generate, no ddapo_attention | HF generate, ddapo_attention, own forward | '
                'HF generate, ddapo_attention, old_logps | vLLM colocate, no ddapo_attention |') in text
        assert '| reward cost, share of the step | - | 5.000% | 1.538% | - | 14.286% | 1.639% |' in text
        assert '| _prepare_batch_inputs (old log-prob forward), median (s) | 0.300 | 0.300 | 0.320 |' in text
        assert 'vLLM colocate: step time ddapo_attention, own forward / without = 1.167x' in text
