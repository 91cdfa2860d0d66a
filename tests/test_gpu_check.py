"""examples/train/grpo/gpu_check.py: its logic on the CPU (--cpu smoke: two real swift rlhf runs and the table), the
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
    """The whole script on the CPU: both runs finish, the table has every row, the rewards are finite and vary."""

    def test_smoke(self, tmp_path):
        env = {k: v for k, v in os.environ.items() if not k.startswith('DDAPO_')}
        result = subprocess.run([sys.executable, SCRIPT, '--cpu', '--steps', '2', '--output-dir', str(tmp_path)],
                                capture_output=True, text=True, env=env, timeout=600)
        out = result.stdout
        assert result.returncode == 0, (out + result.stderr)[-5000:]
        assert 'GPU check on CPU (smoke test, tiny model)' in out
        for row in ('| step time, median of steps 2.. (s) |', '| ddapo_attention call, median (s) | - |',
                    '| peak GPU memory allocated (GiB) | n/a | n/a |', '| rewards/DDAPOAttentionORM/mean per step |'):
            assert row in out, out
        assert 'rewards finite and varying' in out
        assert (tmp_path / 'with' / 'reward_times.jsonl').read_text().count('\n') == 2  # one timed call per step
        assert not (tmp_path / 'without' / 'reward_times.jsonl').exists()


class TestGpuRun:
    """The GPU run as composed (no GPU needed): bf16, LoRA, sdpa, ZeRO-3 on one process, 8 x 384, HF rollouts, the
    timing plugin after the reward's; the random model has Qwen2.5-VL-3B's size."""

    def test_command(self, tmp_path):
        args = argparse.Namespace(cpu=False, model_type='qwen2_5_vl', steps=4, num_generations=8, completion_length=384)
        inputs = {'model': 'm', 'dataset': 'd', 'timing_plugin': 'timing.py'}
        cmd = gpu_check.command(inputs, args, ['ddapo_attention', 'format'], str(tmp_path))
        text = ' '.join(cmd)
        for part in ('--torch_dtype bfloat16', '--tuner_type lora', '--attn_impl sdpa', '--deepspeed zero3',
                     '--use_vllm false', '--num_generations 8', '--max_completion_length 384',
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


class TestVerdicts:
    """Edge cases: constant rewards fail, non-finite rewards fail, the 10% target is stated on a GPU only, and is read
    against the vLLM step when the vLLM arms ran."""

    @staticmethod
    def arm(rewards, stds, steps=(9.0, 2.0, 2.0), reward_times=(1.0, 0.1, 0.1)):
        return {'rewards': rewards, 'reward_stds': stds, 'step_times': list(steps), 'reward_times': list(reward_times),
                'peak': None, 'lengths': [8.0, 8.0, 8.0]}

    def runs(self, rewards, stds, **with_arm):
        return {('hf', 'without'): self.arm([], [], steps=(9.0, 1.9, 1.9), reward_times=()),
                ('hf', 'with'): self.arm(rewards, stds, **with_arm)}

    def test_varying(self):
        failures, notes = gpu_check.verdicts(self.runs([0.4, 0.45], [0.02, 0.03]), gpu=True)
        assert not failures and 'takes 5.0% of the hf GRPO step: within the 10% target' in notes[-1]

    def test_constant_and_non_finite(self):
        assert 'do not vary' in gpu_check.verdicts(self.runs([0.5, 0.5], [0.0, 0.0]), gpu=False)[0][0]
        assert 'not finite' in gpu_check.verdicts(self.runs([0.5, math.nan], [0.1, 0.1]), gpu=False)[0][0]

    def test_above_target(self):
        _, notes = gpu_check.verdicts(self.runs([0.4, 0.5], [0.1, 0.1], reward_times=(1, 0.5, 0.5)), gpu=True)
        assert 'takes 25.0% of the hf GRPO step: ABOVE the 10% target' in notes[-1]

    def test_vllm_step_is_the_target(self):
        """With fast rollouts the same reward call is a larger share of a shorter step."""
        runs = self.runs([0.4, 0.5], [0.1, 0.1])
        runs[('vllm', 'without')] = self.arm([], [], steps=(5.0, 0.6, 0.6), reward_times=())
        runs[('vllm', 'with')] = self.arm([0.4, 0.5], [0.1, 0.1], steps=(5.0, 0.7, 0.7))
        failures, notes = gpu_check.verdicts(runs, gpu=True)
        assert not failures and 'takes 14.3% of the vllm GRPO step: ABOVE the 10% target' in notes[-1]
        text = '\n'.join(gpu_check.table('GPU', runs))
        assert ('| measure | HF generate, without ddapo_attention | HF generate, with ddapo_attention | '
                'vLLM colocate, without ddapo_attention | vLLM colocate, with ddapo_attention |') in text
        assert '| ddapo_attention share of the step | - | 5.000% | - | 14.286% |' in text
        assert 'vLLM colocate: step time with / without ddapo_attention = 1.167x' in text
