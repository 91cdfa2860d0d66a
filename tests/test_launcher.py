"""run_grpo_with_ddapo.sh: the composed two-GPU command (dry run), and the offline demo run for real."""
import os
import re
import shlex
import subprocess

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, 'run_grpo_with_ddapo.sh')
PLUGIN = os.path.join(ROOT, 'examples', 'train', 'grpo', 'plugin', 'plugin.py')
OVERRIDABLE = ('MODEL', 'MODEL_TYPE', 'TEMPLATE', 'DATASET', 'OUTPUT_DIR', 'NPROC_PER_NODE', 'CUDA_VISIBLE_DEVICES',
               'DEEPSPEED', 'BATCH_SIZE', 'NUM_GENERATIONS', 'REWARD_FUNCS', 'MAX_STEPS', 'ROLLOUT', 'VLLM_MODE',
               'SLEEP_LEVEL', 'VLLM_SERVER_HOST', 'VLLM_SERVER_PORT', 'NNODES', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT',
               'DS_ACCELERATOR', 'EXPERIMENT', 'REWARD_WEIGHTS', 'SOFT_CACHE_LENGTH')


def run_script(*args, timeout=60, **env):
    base = {k: v for k, v in os.environ.items() if k not in OVERRIDABLE and not k.startswith('DDAPO_')}
    return subprocess.run(['bash', SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**base, **env})


# A host with no visible GPU, whatever this machine has: torch counts no device for an invalid id (an empty value
# would be replaced by the launcher's default 0,1).
NO_GPU = {'CUDA_VISIBLE_DEVICES': '-1'}


def hiding(folder, *modules) -> str:
    """A PYTHONPATH entry whose sitecustomize makes ``modules`` not importable, whatever is installed."""
    (folder / 'sitecustomize.py').write_text('import sys\n' + ''.join(f"sys.modules['{m}'] = None\n" for m in modules))
    return str(folder)


def composed(result):
    """(environment shown, argv) from the script's `+ ...` line."""
    line = next(line for line in result.stdout.splitlines() if line.startswith('+ '))
    words = shlex.split(line[2:])
    shown = next(i for i, w in enumerate(words) if '=' not in w)
    return dict(w.split('=', 1) for w in words[:shown]), words[shown:]


def flag(argv, name):
    i = argv.index(name)
    values = []
    for word in argv[i + 1:]:
        if word.startswith('--'):
            break
        values.append(word)
    return values


class TestDryRun:
    """Edge cases: defaults, environment overrides, pass-through arguments (later flags win), demo mode."""

    def test_two_gpu_defaults(self):
        result = run_script('--dry-run')
        assert result.returncode == 0, result.stderr
        env, argv = composed(result)
        assert env == {'NPROC_PER_NODE': '2', 'CUDA_VISIBLE_DEVICES': '0,1', 'MAX_PIXELS': '401408'}
        assert argv[argv.index('rlhf') - 1] in ('swift', 'swift.cli.main')
        assert flag(argv, '--rlhf_type') == ['grpo'] and flag(argv, '--use_vllm') == ['true']
        # vLLM colocate, asleep (weights on the CPU, KV cache freed) while the policy trains and the reward forward runs
        assert flag(argv, '--vllm_mode') == ['colocate'] and flag(argv, '--sleep_level') == ['1']
        assert flag(argv, '--vllm_max_model_len') == ['2560']  # MAX_LENGTH + MAX_COMPLETION_LENGTH
        assert flag(argv, '--external_plugins') == [PLUGIN]
        assert flag(argv, '--reward_funcs') == ['ddapo_attention', 'format', 'answer_match']
        assert flag(argv, '--deepspeed') == ['zero2'] and flag(argv, '--tuner_type') == ['lora']
        # no LoRA dropout: the reward reads attention inside the old log-prob forward (DDAPO_FORWARD=auto)
        assert flag(argv, '--lora_dropout') == ['0']
        assert flag(argv, '--model') == ['Qwen/Qwen2.5-VL-3B-Instruct']
        generations, per_gpu = int(flag(argv, '--num_generations')[0]), int(flag(argv, '--per_device_train_batch_size')[0])
        assert (2 * per_gpu) % generations == 0, 'the generation batch must hold whole groups'
        assert 'Traceback' not in result.stderr

    def test_overrides_and_pass_through(self):
        result = run_script('--dry-run', '--num_train_epochs', '3', MODEL='/models/Qwen2-VL-7B-Instruct',
                            NPROC_PER_NODE='4', CUDA_VISIBLE_DEVICES='0,1,2,3', DEEPSPEED='zero3',
                            OUTPUT_DIR='/tmp/o', REWARD_FUNCS='ddapo_attention')
        env, argv = composed(result)
        assert env['NPROC_PER_NODE'] == '4' and env['CUDA_VISIBLE_DEVICES'] == '0,1,2,3'
        assert flag(argv, '--model') == ['/models/Qwen2-VL-7B-Instruct'] and flag(argv, '--deepspeed') == ['zero3']
        assert flag(argv, '--reward_funcs') == ['ddapo_attention'] and flag(argv, '--output_dir') == ['/tmp/o/train']
        assert argv[-2:] == ['--num_train_epochs', '3']

    @pytest.mark.parametrize('model_type, template', [('qwen3_5_moe', 'qwen3_5'), ('qwen3_vl_moe', 'qwen3_vl'),
                                                      ('qwen3_5', 'qwen3_5'), ('internvl', 'internvl_hf'),
                                                      ('glm4v_moe', 'glm4_5v'), ('gemma3_vision', 'gemma3_vision')])
    def test_model_type_and_template(self, model_type, template):
        """A MoE family's template is its dense family's; a MODEL_TYPE whose family has one template gets it."""
        result = run_script('--dry-run', MODEL_TYPE=model_type, MODEL='/ckpt/step-100')
        _, argv = composed(result)
        assert flag(argv, '--model_type') == [model_type] and flag(argv, '--template') == [template]

    # released models, as their hub ids name them -> ms-swift's --model_type and --template (ms-swift 4.6.0's
    # register_model lists, swift/model/models/*.py)
    @pytest.mark.parametrize('model, model_type, template', [
        ('Qwen/Qwen2.5-VL-3B-Instruct', 'qwen2_5_vl', 'qwen2_5_vl'), ('Qwen/Qwen2-VL-7B-Instruct', 'qwen2_vl', 'qwen2_vl'),
        ('XiaomiMiMo/MiMo-VL-7B-RL', 'qwen2_5_vl', 'mimo_vl'), ('Qwen/Qwen3-VL-8B-Instruct', 'qwen3_vl', 'qwen3_vl'),
        ('Qwen/Qwen3-VL-30B-A3B-Thinking', 'qwen3_vl_moe', 'qwen3_vl'), ('Qwen/Qwen3.5-35B-A3B', 'qwen3_5_moe', 'qwen3_5'),
        ('OpenGVLab/InternVL3-8B-hf', 'internvl', 'internvl_hf'),
        ('/models/InternVL3_5-30B-A3B-HF', 'internvl', 'internvl_hf'),
        ('zai-org/GLM-4.1V-9B-Thinking', 'glm4v', 'glm4v'), ('zai-org/GLM-4.6V-Flash', 'glm4v', 'glm4_5v'),
        ('zai-org/GLM-4.5V', 'glm4v_moe', 'glm4_5v'), ('zai-org/GLM-4.6V', 'glm4v_moe', 'glm4_5v'),
        ('google/gemma-3-12b-it', 'gemma3_vision', 'gemma3_vision'),
        ('google/medgemma-4b-it', 'gemma3_vision', 'gemma3_vision'), ('meta-llama/Llama-3.1-8B', None, None)])
    def test_model_names_its_family(self, model, model_type, template):
        """MODEL alone composes the family's --model_type and --template (ms-swift cannot choose GLM-4.1V's template
        from GLM-4.6V-Flash's, nor Qwen2.5-VL's from MiMo-VL's); a model of no family leaves both to ms-swift."""
        _, argv = composed(run_script('--dry-run', MODEL=model))
        assert flag(argv, '--model') == [model]
        if model_type is None:
            assert '--model_type' not in argv and '--template' not in argv
        else:
            assert flag(argv, '--model_type') == [model_type] and flag(argv, '--template') == [template]

    def test_ambiguous_template(self):
        """MODEL_TYPE=glm4v with a name that does not say which GLM: refused, naming TEMPLATE and its choices; with
        TEMPLATE set, it runs."""
        result = run_script('--dry-run', MODEL_TYPE='glm4v', MODEL='/ckpt/step-100')
        assert result.returncode == 2 and 'set TEMPLATE (glm4v for glm-4.1v-*; glm4_5v for' in result.stderr
        _, argv = composed(run_script('--dry-run', MODEL_TYPE='glm4v', MODEL='/ckpt/step-100', TEMPLATE='glm4_5v'))
        assert flag(argv, '--model_type') == ['glm4v'] and flag(argv, '--template') == ['glm4_5v']

    def test_template_override(self):
        _, argv = composed(run_script('--dry-run', MODEL_TYPE='qwen3_5_moe', TEMPLATE='qwen3_8'))
        assert flag(argv, '--model_type') == ['qwen3_5_moe'] and flag(argv, '--template') == ['qwen3_8']

    def test_hf_rollout(self):
        _, argv = composed(run_script('--dry-run', ROLLOUT='hf'))
        assert flag(argv, '--use_vllm') == ['false'] and '--vllm_mode' not in argv and '--sleep_level' not in argv

    def test_vllm_server(self):
        _, argv = composed(run_script('--dry-run', VLLM_MODE='server', VLLM_SERVER_HOST='10.0.0.5',
                                      VLLM_SERVER_PORT='8001'))
        assert flag(argv, '--use_vllm') == ['true'] and flag(argv, '--vllm_mode') == ['server']
        assert flag(argv, '--vllm_server_host') == ['10.0.0.5'] and flag(argv, '--vllm_server_port') == ['8001']
        assert '--sleep_level' not in argv  # colocate only

    def test_two_nodes(self):
        env, _ = composed(run_script('--dry-run', NNODES='2', NODE_RANK='1', MASTER_ADDR='10.0.0.1',
                                     MASTER_PORT='29500'))
        assert {k: env[k] for k in ('NNODES', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT')} == {
            'NNODES': '2', 'NODE_RANK': '1', 'MASTER_ADDR': '10.0.0.1', 'MASTER_PORT': '29500'}

    def test_gpu_check_mode(self):
        result = run_script('--gpu-check', '--help')
        assert result.returncode == 0 and '--cpu' in result.stdout and 'Qwen2.5-VL-3B' in result.stdout

    def test_demo_dry_run_builds_nothing(self, tmp_path):
        result = run_script('--demo', '--dry-run', OUTPUT_DIR=str(tmp_path))
        env, argv = composed(result)
        assert env['NPROC_PER_NODE'] == '1' and '--deepspeed' not in argv
        assert flag(argv, '--model') == [str(tmp_path / 'tiny-qwen2_5_vl-warm')]
        assert flag(argv, '--max_completion_length') == ['24']  # the warm start's longest completion: 22 tokens
        assert flag(argv, '--check_model') == ['false'] and flag(argv, '--use_vllm') == ['false']  # HF rollouts
        assert list(tmp_path.iterdir()) == []

    def test_demo_vllm_on_cpu(self, tmp_path):
        """ROLLOUT=vllm --demo on a machine without a GPU: the 32-wide-head build, vLLM's CPU settings (no sleep mode,
        eager, a small model length) and the plugin that keeps the weights its CPU kernels repack."""
        env, argv = composed(run_script('--demo', '--dry-run', ROLLOUT='vllm', OUTPUT_DIR=str(tmp_path), **NO_GPU))
        assert flag(argv, '--model') == [str(tmp_path / 'tiny-qwen2_5_vl-head32-warm')]
        assert flag(argv, '--use_vllm') == ['true'] and flag(argv, '--vllm_mode') == ['colocate']
        assert flag(argv, '--sleep_level') == ['0'] and flag(argv, '--vllm_enforce_eager') == ['true']
        assert flag(argv, '--external_plugins') == [PLUGIN, os.path.join(ROOT, 'examples', 'train', 'grpo',
                                                                          'vllm_cpu_weights.py')]
        assert env['CUDA_VISIBLE_DEVICES'] == ''


class TestPrerequisites:
    """Checked before anything starts, each naming its fix (on any host: the tests hide its GPUs and, where they need
    it, vllm or deepspeed): vllm not importable for
    ROLLOUT=vllm; bad rollout and node settings; deepspeed not
    importable when DEEPSPEED asks for it (DEEPSPEED=none and an empty value run without it); a model or dataset
    that is neither a path nor a hub id; fewer visible GPUs than NPROC_PER_NODE."""

    @pytest.fixture()
    def no_deepspeed(self, tmp_path):
        return hiding(tmp_path, 'deepspeed')

    def test_vllm_missing(self, tmp_path):
        """ROLLOUT=vllm (the default) where vllm is not importable: the fix is named."""
        result = run_script(PYTHONPATH=hiding(tmp_path, 'vllm'), **NO_GPU)
        assert result.returncode == 2, result.stderr
        assert 'ROLLOUT=vllm needs the vllm package' in result.stderr and 'pip install -e ".[vllm]"' in result.stderr
        assert 'ROLLOUT=hf' in result.stderr

    @pytest.mark.parametrize('env, message', [
        ({'ROLLOUT': 'trl'}, 'ROLLOUT=trl: use vllm'), ({'ROLLOUT': 'vllm', 'VLLM_MODE': 'remote'}, 'VLLM_MODE=remote: use colocate'),
        ({'ROLLOUT': 'vllm', 'SLEEP_LEVEL': '3'}, 'SLEEP_LEVEL=3: use 0, 1 or 2'),
        ({'NNODES': '2', 'NODE_RANK': '0'}, 'NNODES=2 needs both MASTER_ADDR and MASTER_PORT'),
        ({'NNODES': '2', 'NODE_RANK': '0', 'MASTER_ADDR': '10.0.0.1'}, 'NNODES=2 needs both MASTER_ADDR and'),
        ({'NNODES': '2', 'MASTER_ADDR': '10.0.0.1', 'MASTER_PORT': '29500'}, 'NNODES=2 needs NODE_RANK'),
        ({'NNODES': '2', 'NODE_RANK': '2', 'MASTER_ADDR': '10.0.0.1', 'MASTER_PORT': '29500'}, '0 to 1'),
        ({'NNODES': 'two'}, 'NNODES=two must be a whole number'),
        ({'NPROC_PER_NODE': 'two'}, 'NPROC_PER_NODE=two must be a whole number of processes'),
        ({'NPROC_PER_NODE': '0'}, 'NPROC_PER_NODE=0 must be a whole number of processes'),
        ({'NODE_RANK': '1'}, 'NODE_RANK=1 without NNODES')])
    def test_bad_settings(self, env, message):
        """Each stops the run before anything starts, naming the fix."""
        result = run_script(**{'ROLLOUT': 'hf', **NO_GPU, **env})
        assert result.returncode == 2 and message in result.stderr, result.stderr

    @pytest.mark.parametrize('env', [{'DS_ACCELERATOR': 'cpu', 'DEEPSPEED': 'zero3'}, {'DEEPSPEED': 'none'}])
    def test_cpu_processes(self, env, tmp_path):
        """Several demo processes on a machine without a GPU do not run data-parallel (DeepSpeed: no backend, one
        process counted; without it each process trains alone, or ms-swift's advantage split stops under gloo):
        refused with the reasons and the fix before anything is built; a single CPU process with DeepSpeed is
        composed."""
        result = run_script('--demo', NPROC_PER_NODE='2', OUTPUT_DIR=str(tmp_path), **NO_GPU, **env)
        assert result.returncode == 2 and 'GRPO does not run data-parallel on CPU processes' in result.stderr
        assert 'NPROC_PER_NODE=1' in result.stderr and list(tmp_path.iterdir()) == []
        _, argv = composed(run_script('--demo', '--dry-run', DS_ACCELERATOR='cpu', DEEPSPEED='zero3',
                                      OUTPUT_DIR=str(tmp_path), **NO_GPU))
        assert flag(argv, '--deepspeed') == ['zero3'] and flag(argv, '--fp16') == ['false']

    def test_deepspeed_missing(self, no_deepspeed):
        result = run_script(PYTHONPATH=no_deepspeed, ROLLOUT='hf', **NO_GPU)
        assert result.returncode == 2 and 'DEEPSPEED=zero2 needs the deepspeed package' in result.stderr
        assert 'pip install -e ".[deepspeed]"' in result.stderr and 'DEEPSPEED=none' in result.stderr

    @pytest.mark.parametrize('value', ['none', ''])
    def test_without_deepspeed(self, no_deepspeed, value):
        result = run_script(PYTHONPATH=no_deepspeed, DEEPSPEED=value, ROLLOUT='hf', **NO_GPU)
        assert '--deepspeed' not in composed(result)[1] and 'deepspeed' not in result.stderr
        assert 'visible GPUs' in result.stderr and result.returncode == 2  # the next check: no GPU is visible

    @pytest.mark.parametrize('name, value', [('MODEL', '/no/such/model'), ('MODEL', 'not a hub id'),
                                             ('DATASET', './missing.jsonl'), ('DATASET', 'AI-ModelScope/x /nope')])
    def test_model_and_dataset(self, name, value):
        result = run_script(**{name: value, 'ROLLOUT': 'hf', **NO_GPU})
        assert result.returncode == 2 and f'{name}=' in result.stderr and 'neither' in result.stderr, result.stderr

    def test_gpus(self, tmp_path):
        data = tmp_path / 'train.jsonl'
        data.write_text('{}\n')
        result = run_script(MODEL=str(tmp_path), DATASET=f'{data}#100', ROLLOUT='hf', **NO_GPU)
        assert result.returncode == 2
        assert 'NPROC_PER_NODE=2 needs 2 visible GPUs and 0 are visible' in result.stderr and '--demo' in result.stderr


# The reference system's experiments (seed 002) as written there: [accuracy, VGR, format, length] weights, early weights
SEED_EXPERIMENTS = {1: ('2.5 0 0.5 1', '1 0 2 1'), 2: ('0 2.5 0.5 1', '0 1 2 1'), 3: ('2.5 1 0.5 1', '1 1 2 1'),
                    4: ('2.5 1 0.5 1', '1 1 2 1'), 5: ('2.5 0 0.5 1', '1 0 2 1')}


class TestExperiments:
    """EXPERIMENT=1..5: the printed command has the seed's rewards in its order (answer_match, ddapo_attention, format,
    ms-swift's soft_overlong with --soft_cache_length 50 at 512 tokens), its weights and early weights, and the
    reward settings (gated with answer_match for 4, token weights for 5). Edge cases: explicit REWARD_WEIGHTS, DDAPO_*
    and later flags win; an unknown experiment stops with exit 2; the demo's short completions get a shorter cache."""

    @pytest.mark.parametrize('experiment', sorted(SEED_EXPERIMENTS))
    def test_preset(self, experiment):
        result = run_script('--dry-run', EXPERIMENT=str(experiment))
        assert result.returncode == 0, result.stderr
        env, argv = composed(result)
        weights, early = SEED_EXPERIMENTS[experiment]
        assert flag(argv, '--reward_funcs') == ['answer_match', 'ddapo_attention', 'format', 'soft_overlong']
        assert flag(argv, '--reward_weights') == weights.split() and env['DDAPO_EARLY_REWARD_WEIGHTS'] == early
        assert flag(argv, '--soft_cache_length') == ['50'] and flag(argv, '--max_completion_length') == ['512']
        assert env['DDAPO_REWARD'] == {4: 'gated'}.get(experiment, 'group')
        assert ('DDAPO_GATE_REWARD' in env) == (experiment == 4) and ('DDAPO_TOKEN_WEIGHTS' in env) == (experiment == 5)
        from ddapo.core.config import DDAPOConfig  # the settings it exports are valid ones
        DDAPOConfig.from_env({k: v for k, v in env.items() if k.startswith('DDAPO_')})

    def test_explicit_settings_win(self):
        result = run_script('--dry-run', '--reward_weights', '1', '1', '1', '1', EXPERIMENT='3', DDAPO_REWARD='balance',
                            DDAPO_EARLY_REWARD_WEIGHTS='0 0 1 1', MAX_COMPLETION_LENGTH='24')
        env, argv = composed(result)
        assert env['DDAPO_REWARD'] == 'balance' and env['DDAPO_EARLY_REWARD_WEIGHTS'] == '0 0 1 1'
        last = len(argv) - 1 - argv[::-1].index('--reward_weights')
        assert argv[last + 1:last + 5] == ['1'] * 4  # after the preset's: ms-swift takes the last
        assert flag(argv, '--soft_cache_length') == ['3']  # a tenth of 24 tokens, rounded up

    def test_groups_and_lengths(self):
        """DDAPO_REWARD set decides the variant with its gate (no stray DDAPO_GATE_REWARD); an empty
        DDAPO_EARLY_REWARD_WEIGHTS is no warm-up; the cache is the reference's 50 at 384 tokens, and follows a later
        --max_completion_length; REWARD_FUNCS without REWARD_WEIGHTS stops (exit 2)."""
        env, argv = composed(run_script('--dry-run', EXPERIMENT='4', DDAPO_REWARD='balance',
                                        DDAPO_EARLY_REWARD_WEIGHTS='', MAX_COMPLETION_LENGTH='384'))
        assert env['DDAPO_REWARD'] == 'balance' and 'DDAPO_GATE_REWARD' not in env
        assert env['DDAPO_EARLY_REWARD_WEIGHTS'] == '' and flag(argv, '--soft_cache_length') == ['50']
        from ddapo.core.config import DDAPOConfig
        assert DDAPOConfig.from_env({k: v for k, v in env.items() if k.startswith('DDAPO_')}).early_reward_weights == ()
        _, argv = composed(run_script('--dry-run', '--max_completion_length', '40', EXPERIMENT='3'))
        assert flag(argv, '--soft_cache_length') == ['4']
        result = run_script('--dry-run', EXPERIMENT='3', REWARD_FUNCS='answer_match ddapo_attention format')
        assert result.returncode == 2 and 'set REWARD_WEIGHTS' in result.stderr

    def test_unknown_experiment(self):
        result = run_script('--dry-run', EXPERIMENT='6')
        assert result.returncode == 2 and 'EXPERIMENT=6: use 1 to 5' in result.stderr


@pytest.mark.slow
class TestDemo:
    """The product end to end: one command, offline, on this machine's CPU."""

    def test_demo(self, tmp_path):
        result = run_script('--demo', OUTPUT_DIR=str(tmp_path), timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
        table = result.stdout[result.stdout.index('DDAPO demo'):].splitlines()[1:]
        header = [c.strip() for c in table[0].split('|')]
        assert header[:2] == ['step', 'DDAPOAttentionORM'] and 'Format' in header and 'AnswerMatchORM' in header
        rows = [[float(c) for c in line.split('|')] for line in table[1:] if re.match(r'\s+\d+ \|', line)]
        assert [int(r[0]) for r in rows] == list(range(1, 7))
        ddapo = [r[1] for r in rows]
        assert all(0.0 <= v <= 1.0 for v in ddapo) and max(ddapo) - min(ddapo) > 1e-4, ddapo
        # the warm-started model answers: the format and the answer score on most steps
        for name in ('Format', 'AnswerMatchORM'):
            scores = [r[header.index(name)] for r in rows]
            assert sum(v > 0 for v in scores) >= 4, (name, scores)
        assert (tmp_path / 'tiny-qwen2_5_vl-warm' / 'warm_start.json').exists()
        report = re.search(r'DDAPO report \(.*\): (\S+report\.md)', result.stdout)
        assert report and os.path.exists(report.group(1)) and '## step 1 (train)' in open(report.group(1)).read()
        # the launcher's non-reentrant checkpointing: no per-step torch warning from ms-swift's no-grad forwards
        assert 'None of the inputs have requires_grad=True' not in result.stdout + result.stderr
        assert (tmp_path / 'shapes' / 'train.jsonl').exists()
        from ddapo_demo import prepare  # cached: a second prepare with the launcher's system prompt builds nothing
        _, argv = composed(result)
        models = [tmp_path / name / 'model.safetensors' for name in ('tiny-qwen2_5_vl', 'tiny-qwen2_5_vl-warm')]
        mtimes = [os.path.getmtime(m) for m in models]
        prepare(str(tmp_path), flag(argv, '--system')[0])
        assert [os.path.getmtime(m) for m in models] == mtimes
