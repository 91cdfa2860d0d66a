"""examples/train/grpo/gpu_check.py: its logic on the CPU (--cpu smoke: two real swift rlhf runs and the table), the
GPU run's command and model size, and its verdicts. The GPU figures themselves need a GPU (README, "Running at scale")."""
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
    """Edge cases: constant rewards fail, non-finite rewards fail, the overhead target is stated on a GPU only."""

    @staticmethod
    def runs(rewards, stds, t0=(9.0, 2.0, 2.0), t1=(9.0, 2.1, 2.1)):
        return {'without': {'step_times': list(t0)},
                'with': {'rewards': rewards, 'reward_stds': stds, 'step_times': list(t1)}}

    def test_varying(self):
        failures, notes = gpu_check.verdicts(self.runs([0.4, 0.45], [0.02, 0.03]), gpu=True)
        assert not failures and 'adds 5.0% to the GRPO step: within the 10% target' in notes[-1]

    def test_constant_and_non_finite(self):
        assert 'do not vary' in gpu_check.verdicts(self.runs([0.5, 0.5], [0.0, 0.0]), gpu=False)[0][0]
        assert 'not finite' in gpu_check.verdicts(self.runs([0.5, math.nan], [0.1, 0.1]), gpu=False)[0][0]

    def test_above_target(self):
        _, notes = gpu_check.verdicts(self.runs([0.4, 0.5], [0.1, 0.1], t1=(9, 2.5, 2.5)), gpu=True)
        assert 'adds 25.0% to the GRPO step: ABOVE the 10% target' in notes[-1]
