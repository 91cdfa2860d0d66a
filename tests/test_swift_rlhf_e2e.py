"""Real ``swift rlhf --rlhf_type grpo`` runs on CPU: tiny models of every family, the plugin loaded as users load it.

The runs (`RUNS`) are started by one module fixture, two at a time, and each test reads the ones it needs.
"""
import glob
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SWIFT_ARGS

pytestmark = pytest.mark.slow  # real swift rlhf runs
PLUGIN = os.path.join(ROOT, 'examples', 'train', 'grpo', 'plugin', 'plugin.py')
ZOOM_PLUGIN = os.path.join(ROOT, 'examples', 'train', 'grpo', 'plugin', 'zoom_scheduler.py')
# test-only shim for multi-process CPU runs (gloo): a clean process-group exit
CPU_DISTRIBUTED = os.path.join(ROOT, 'tests', 'cpu_distributed')


# test-only hooks (dump rows and rewards for re-scoring; skip padding forwards), loaded after the plugin
TEST_HOOKS = os.path.join(ROOT, 'tests', 'plugins', 'ddapo_test_hooks.py')


def swift_command(model_dir, dataset, output_dir, *extra, model_type='qwen2_5_vl', hooks=False):
    plugins = [PLUGIN, TEST_HOOKS] if hooks else [PLUGIN]
    if '--multi_turn_scheduler' in extra:
        plugins.insert(1, ZOOM_PLUGIN)
    swift_model_type, template = SWIFT_ARGS[model_type]
    return [sys.executable, '-m', 'swift.cli.main', 'rlhf', '--rlhf_type', 'grpo', '--model', model_dir,
           '--model_type', swift_model_type, '--template', template, '--check_model', 'false',
           '--use_vllm', 'false',
           '--external_plugins', *plugins, '--reward_funcs', 'ddapo_attention', '--dataset', dataset,
           '--tuner_type', 'lora', '--lora_dropout', '0', '--torch_dtype', 'float32', '--num_generations', '2',
           '--per_device_train_batch_size', '4', '--max_completion_length', '8', '--logging_steps', '1',
           '--output_dir', output_dir, '--report_to', 'none', '--dataloader_num_workers', '0', '--save_strategy', 'no',
           '--seed', '1', *extra]


def swift_rlhf(model_dir, dataset, output_dir, *extra, model_type='qwen2_5_vl', env_extra=None):
    """One real run in ``output_dir`` (its working directory); the test hooks plugin joins it when ``env_extra`` sets
    one of its variables (TEST_DDAPO_*)."""
    hooks = any(k.startswith('TEST_DDAPO_') for k in (env_extra or {}))
    cmd = swift_command(model_dir, dataset, output_dir, *extra, model_type=model_type, hooks=hooks)
    env = {k: v for k, v in os.environ.items() if not k.startswith('DDAPO_')}
    env.update(HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1', **(env_extra or {}))
    if env.get('NPROC_PER_NODE', '1') != '1':
        env['PYTHONPATH'] = os.pathsep.join([CPU_DISTRIBUTED, env.get('PYTHONPATH', '')])
    os.makedirs(output_dir, exist_ok=True)  # the run's working directory too: wandb/ and swanlog/ land there
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=output_dir)


@pytest.fixture(scope='module')
def mixed_dataset(tmp_path_factory):
    from tiny_qwen_vl import build_shapes_dataset
    # every third prompt is text-only: those rows give None, and a step with only such rows runs ms-swift's
    # all-None row warning with the trainer in the reward kwargs
    return build_shapes_dataset(str(tmp_path_factory.mktemp('mixed')), num_rows=12, text_only_every=3)


def logged_means(output_dir):
    records = [json.loads(line) for path in glob.glob(os.path.join(output_dir, '**', 'logging.jsonl'), recursive=True)
               for line in open(path)]
    return records, [r['rewards/DDAPOAttentionORM/mean'] for r in records if 'rewards/DDAPOAttentionORM/mean' in r]


FAMILY_TYPES = ('qwen3_vl', 'qwen3_vl_moe', 'qwen3_5', 'qwen3_5_moe', 'internvl', 'internvl_qwen3_moe', 'glm4v',
                'glm4v_moe', 'gemma3_vision')
# L_att of each family run's tiny build, and its share of the decoder layers
FAMILY_LAYERS = {'qwen3_5': ([1, 3, 5], 6), 'qwen3_5_moe': ([1, 3, 5], 6), 'gemma3_vision': ([1, 3, 5], 6)}
# family runs read from another run of this module: Qwen3.5's is the eager full-tuning run of TestForwardPath, Qwen3-VL's
# the multi-turn run of TestMultiTurnRun
FAMILY_SHARED = {'qwen3_5': 'forward_auto_eager', 'qwen3_vl': 'multi_turn'}
# families whose run reads the reward's own forwards (LoRA dropout on), with groups in shared packs
OWN_FAMILIES = ('internvl', 'internvl_qwen3_moe')
VAL_DATASET = '{mixed}'  # a run's --val_dataset: the held-out set, with text-only rows (filled in by the runs fixture)
# what the start log says L_att leaves out
LEFT_OUT = {'qwen3_5': 'linear_attention', 'qwen3_5_moe': 'linear_attention', 'gemma3_vision': 'sliding_attention'}
TOKEN_WEIGHT_ARGS = ['--max_steps', '2', '--save_strategy', 'steps', '--save_steps', '2', '--save_only_model', 'true',
                     '--lr_scheduler_type', 'constant', '--learning_rate', '1e-3']
# The same seeded run under DDAPO_FORWARD=auto (old_logps) and own, with ddapo_attention weighted 0 and another reward
# steering (test_steer, from the test hooks), two micro-batches per generation, text-only rows mixed in; GRPO's old
# log-probs and every row's reward dumped.
FORWARD_ARGS = ['--max_steps', '2', '--gradient_accumulation_steps', '2', '--reward_funcs', 'ddapo_attention',
                'test_steer', '--reward_weights', '0', '1']
FORWARD_DUMPS = {'TEST_DDAPO_DUMP_DIR': 'dump', 'TEST_DDAPO_OLD_LOGPS_DUMP': 'old_logps'}
# the trainer's attention implementation -> (model type, extra arguments)
# (the sdpa pair trains on --padding_side left: the capture reads left-padded micro-batches there)
FORWARD_PAIRS = {'sdpa': ('qwen2_5_vl', ['--padding_side', 'left']),
                 'eager': ('qwen3_5', ['--tuner_type', 'full', '--attn_impl', 'eager'])}
# Every swift rlhf run of this module: name -> (model type, dataset, extra arguments, environment).
RUNS = {
    # also TestValidationRun's run without validation steps (rewards dumped per row)
    'grpo': ('qwen2_5_vl', 'mixed', ['--max_steps', '4'], {'TEST_DDAPO_DUMP_DIR': 'dump'}),
    'stock': ('qwen2_5_vl', 'shapes', TOKEN_WEIGHT_ARGS, {}),
    'unit': ('qwen2_5_vl', 'shapes', TOKEN_WEIGHT_ARGS, {'DDAPO_TOKEN_WEIGHTS': '1', 'DDAPO_TOKEN_WEIGHT_CLIP': '1,1'}),
    'weighted': ('qwen2_5_vl', 'shapes', TOKEN_WEIGHT_ARGS + ['--report_to', 'tensorboard', 'wandb', 'swanlab',
                                                              '--swanlab_mode', 'local'],
                 {'DDAPO_TOKEN_WEIGHTS': '1', 'WANDB_MODE': 'offline', 'DDAPO_VALIDATE_STEPS': '2'}),
    'full_no_checkpointing_group_reward_late_layers': (
        'qwen2_5_vl', 'mixed', ['--max_steps', '2', '--tuner_type', 'full', '--gradient_checkpointing', 'false'],
        {'DDAPO_REWARD': 'group', 'DDAPO_LAYERS': 'late'}),
    'qwen2_vl_max_length': ('qwen2_vl', 'mixed', ['--max_steps', '2', '--max_length', '40'], {}),
    # 'grpo' with validation steps (every second step: the reward's own forwards there, old_logps on the others)
    'validate_on': ('qwen2_5_vl', 'mixed', ['--max_steps', '4'], {'TEST_DDAPO_DUMP_DIR': 'dump',
                                                                   'DDAPO_VALIDATE_STEPS': '2'}),
    # two ranks on CPU need DeepSpeed with the test shim: plain DDP there trains each process alone (docs/scale.md)
    'two_processes': ('qwen2_5_vl', 'mixed', ['--max_steps', '2', '--deepspeed', 'zero2', '--fp16', 'false',
                                              '--bf16', 'false'],
                      {'NPROC_PER_NODE': '2', 'MASTER_PORT': '29531', 'DS_ACCELERATOR': 'cpu',
                       'DDAPO_TOKEN_WEIGHTS': '1', 'TEST_DDAPO_DUMP_DIR': 'dump'}),
    # InternVL trains with ms-swift's LoRA default --lora_dropout 0.05: auto falls back to the reward's own forwards,
    # whose shared path packs each prompt's two outputs (rows dumped, checked against naive)
    **{f'family_{m}': (m, 'shapes', ['--max_steps', '2'] + (['--lora_dropout', '0.05'] if m in OWN_FAMILIES else []),
                       {'TEST_DDAPO_DUMP_DIR': 'dump'} if m in OWN_FAMILIES else {})
       for m in FAMILY_TYPES if m not in FAMILY_SHARED},
    # GRPO generating every second step (--steps_per_generation 2), logging every second step, validation every
    # second step, and a held-out split (text-only rows in it) evaluated every second step (--val_dataset,
    # --eval_strategy steps); the model
    # is not updated (--learning_rate 0), so that every row, training and evaluation, is checked against naive
    'every_second_step': ('qwen2_5_vl', 'shapes', ['--max_steps', '4', '--steps_per_generation', '2',
                                                  '--logging_steps', '2', '--val_dataset', VAL_DATASET,
                                                  '--eval_strategy', 'steps', '--eval_steps', '2',
                                                  '--per_device_eval_batch_size', '4',
                                                  '--learning_rate', '0'],
                          {'TEST_DDAPO_DUMP_DIR': 'dump', 'DDAPO_VALIDATE_STEPS': '2'}),
    # multi-turn GRPO with the zoom scheduler (3 turns), text-only rows mixed in, token weights on; the model is not
    # updated (--learning_rate 0), so that both steps re-score against the initial model: step 1 reads the old
    # log-prob forward, step 2 is a validation step and runs the reward's own forwards
    'multi_turn': ('qwen3_vl', 'mixed', ['--max_steps', '2', '--gradient_accumulation_steps', '2',
                                           '--multi_turn_scheduler', 'ddapo_zoom', '--max_turns', '3',
                                           '--learning_rate', '0'],
                   {'TEST_DDAPO_DUMP_DIR': 'dump', 'DDAPO_TOKEN_WEIGHTS': '1', 'DDAPO_VALIDATE_STEPS': '2'}),
    **{f'forward_{path}_{impl}': (model_type, 'mixed', FORWARD_ARGS + extra,
                                  {**FORWARD_DUMPS, **({'DDAPO_FORWARD': 'own'} if path == 'own' else {})})
       for impl, (model_type, extra) in FORWARD_PAIRS.items() for path in ('auto', 'own')},
}


def family_run(model_type: str) -> str:
    return FAMILY_SHARED.get(model_type, f'family_{model_type}')


def runs_of(item) -> list:
    """The runs a collected test of this module reads."""
    name = item.cls.__name__ if getattr(item, 'cls', None) else ''
    params = getattr(getattr(item, 'callspec', None), 'params', {})
    return {'TestTrainingVariants': [params.get('variant')], 'TestModelFamilies': [family_run(params.get('model_type'))],
            'TestSwiftRlhfGrpo': ['grpo'],
            'TestTokenWeightsRun': ['stock', 'unit', 'weighted'], 'TestTrackers': ['weighted'],
            'TestForwardPath': [f"forward_{p}_{params.get('implementation')}" for p in ('auto', 'own')],
            'TestValidationRun': ['grpo', 'validate_on'], 'TestMultiTurnRun': ['multi_turn'],
            'TestEverySecondStep': ['every_second_step']}.get(name, [])


class Runs:
    """The runs the selected tests read, two at a time: on 2 cores one run's single-threaded start-up (about 15 s of
    imports) overlaps another's steps. ``result(name)`` waits for a run: ``(output dir, CompletedProcess)``."""

    def __init__(self, names, models, datasets, root):
        from concurrent.futures import ThreadPoolExecutor
        self._executor = ThreadPoolExecutor(max_workers=2)
        self._futures = {}
        for name in names:  # in RUNS order: the longest first
            model_type, dataset, extra, env = RUNS[name]
            extra = [datasets['mixed'] if argument == VAL_DATASET else argument for argument in extra]
            output_dir = str(root / name)
            self._futures[name] = self._executor.submit(
                lambda m=model_type, d=dataset, o=output_dir, x=extra, e=env: (o, swift_rlhf(
                    models[m], datasets[d], o, *x, model_type=m, env_extra=e)))

    def result(self, name):
        output_dir, result = self._futures[name].result()
        # a self-check that disagreed would have replaced the path's rewards with eager's: every check below would
        # then read eager's numbers, so no run of the suite may show one
        assert 'disagrees with eager' not in result.stdout + result.stderr, (result.stdout + result.stderr)[-5000:]
        return output_dir, result

    def close(self):
        for future in self._futures.values():
            future.cancel()
        self._executor.shutdown(wait=True)


@pytest.fixture(scope='module')
def runs(request, tiny_model_dir, mixed_dataset, shapes_dataset, tmp_path_factory):
    wanted = {name for item in request.session.items if item.module is request.module for name in runs_of(item)}
    names = [name for name in RUNS if name in wanted]
    models = {RUNS[name][0]: tiny_model_dir(RUNS[name][0]) for name in names}  # built here, not in the threads
    pool = Runs(names, models, {'mixed': mixed_dataset, 'shapes': shapes_dataset}, tmp_path_factory.mktemp('runs'))
    yield pool
    pool.close()


class TestTrainingVariants:
    """Every way people train, each a real run: full tuning without gradient checkpointing, with the group-robust
    reward (Eq. 8) reading the late third of the layers (a reward setting, orthogonal to the tuning, so one run
    covers both); Qwen2-VL with prompts cut by --max_length (the rollout sees the cut prompt, the training forward
    and the reward the full one); two ranks (NPROC_PER_NODE=2, DeepSpeed ZeRO-2 over gloo on CPU) on text-only and
    image prompts, with token weights, each rank scoring rows of its own."""

    @pytest.mark.parametrize('variant', ['full_no_checkpointing_group_reward_late_layers', 'qwen2_vl_max_length',
                                         'two_processes'])
    def test_variant(self, variant, runs):
        grouped = variant == 'full_no_checkpointing_group_reward_late_layers'
        output_dir, result = runs.result(variant)
        assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
        records, means = logged_means(output_dir)
        low = -0.5 if grouped else 0.0  # Eq. (8) lies in [-0.5, 0.5]
        assert means and all(math.isfinite(m) and low <= m <= 1.0 for m in means), means
        if variant == 'two_processes':
            # really two ranks, each scoring its own rows (not two copies of a one-process run)
            dumps = [[json.loads(line)['images'] for line in open(os.path.join(output_dir, 'dump', f'rank{r}.jsonl'))]
                     for r in (0, 1)]
            assert dumps[0] and dumps[1] and dumps[0] != dumps[1], dumps
            weighted = [r['token_advantage_weights/weighted_frac'] for r in records
                        if 'token_advantage_weights/weighted_frac' in r]
            assert weighted and max(weighted) > 0 and any('ddapo/token_weight/max' in r for r in records), records
        if grouped:
            assert 'DDAPO_REWARD=group' in result.stderr + result.stdout and 'DDAPO_LAYERS=late' in result.stderr
            assert all(0 <= r['ddapo/R_bal/mean'] <= 1 for r in records if 'ddapo/R_bal/mean' in r)


class TestSwiftRlhfGrpo:
    """Edge cases: LoRA with ms-swift's default gradient checkpointing; text-only prompts in the data."""

    def test_reward_logged_and_moving(self, runs):
        output_dir, result = runs.result('grpo')
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-5000:]
        assert '[DDAPO] ms-swift GRPO reward-kwargs patch: applied' in log
        assert '[DDAPO] completions from: Transformers generate (--use_vllm false)' in log
        assert "[DDAPO] attention read: old_logps (DDAPO_FORWARD=auto): attention read inside ms-swift's" in log
        assert '[DDAPO_DEBUG] layers captured: 4 of 4' in log
        assert '[DDAPO] checks: the ids at every position read are the output\'s own' in log
        assert '[DDAPO] self-check: old_logps agrees with eager (max |diff| = ' in log  # the first call only
        assert log.count('[DDAPO] self-check:') == 1
        assert 'reward is None (no_vision_keys)' in log
        assert 'All reward functions returned None' in log  # the all-None row path ran and did not crash
        records, means = logged_means(output_dir)
        assert len(means) >= 2, records
        assert all(math.isfinite(m) and 0.0 <= m <= 1.0 for m in means), means
        assert max(means) - min(means) > 1e-4, f'reward mean is constant: {means}'
        own_forwards = [r['ddapo/own_forwards'] for r in records if 'ddapo/own_forwards' in r]
        assert len(own_forwards) >= len(means) and set(own_forwards) == {0.0}, own_forwards  # every step
        checked = [r['ddapo/self_check/max_abs_diff'] for r in records if 'ddapo/self_check/max_abs_diff' in r]
        assert len(checked) == 1 and checked[0] < 1e-5, checked  # logged on the first step

        # ddapo/* diagnostics from the same forward, in the trainer's own log
        scored = [r for r in records if 'ddapo/M_V/mean' in r]
        assert len(scored) == len(means)
        for r in scored:
            assert 0.0 <= r['ddapo/M_V/mean'] <= 1.0 and r['ddapo/num_vision_keys/mean'] > 0
            assert r['ddapo/num_text_keys/mean'] > 0 and r['ddapo/tdr/median'] > 0 and r['ddapo/eta_V/mean'] > 0
            assert r['ddapo/rho_vis/mean'] > 0 and r['ddapo/rho_text/mean'] > 0
            assert {'ddapo/early/M_V/mean', 'ddapo/middle/M_V/mean', 'ddapo/late/M_V/mean'} <= set(r)
            # seed 003's diagnostics (notation Eq. 15-17), per third, normalised into [0, 1]
            assert all(0.0 <= r[f'ddapo/{third}/{name}/mean'] <= 1.0 for third in ('early', 'middle', 'late')
                       for name in ('MDI', 'H_T', 'H_V'))
        fractions = [r['ddapo/not_applicable_frac'] for r in records if 'ddapo/not_applicable_frac' in r]
        assert all(0.0 <= f <= 1.0 for f in fractions) and max(fractions) > 0  # the text-only rows
        # the report, from the main process, on logging steps
        reports = glob.glob(os.path.join(output_dir, '**', 'ddapo', 'report.md'), recursive=True)
        assert len(reports) == 1, reports
        text = open(reports[0]).read()
        assert text.startswith('# DDAPO report\n\n- completions from: Transformers generate'), text[:300]
        assert '- attention read: old_logps (DDAPO_FORWARD=auto)' in text[:600]
        assert text.count('## step ') >= 2 and 'm^V per generated token:' in text
        assert 'MDI' in text  # the sample's seed 003 diagnostics line
        assert glob.glob(os.path.join(os.path.dirname(reports[0]), '*_image0.png'))


class TestModelFamilies:
    """One short real run per family beyond Qwen2-VL / Qwen2.5-VL (the suite's other runs cover those): Qwen3-VL dense
    and MoE, Qwen3.5 dense and MoE (hybrid: three Gated DeltaNet and three softmax-attention layers, L_att = decoder
    layers 1, 3, 5), InternVL3 and InternVL3.5 with a Qwen3-MoE language model, GLM-4.1V, GLM-4.5V (MoE), Gemma 3
    (eager; sliding-window layers 0, 2, 4 left out of L_att). Qwen3.5's is TestForwardPath's eager full-tuning run.
    The reward is logged, finite and not constant, the capture covers exactly L_att, the start log names the layer
    rule, and the layer-third metrics are logged."""

    @pytest.mark.parametrize('model_type', FAMILY_TYPES)
    def test_family(self, model_type, runs, tiny_model_dir, tmp_path):
        output_dir, result = runs.result(family_run(model_type))
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-5000:]
        layers, total = FAMILY_LAYERS.get(model_type, ([0, 1, 2, 3], 4))
        assert (f'[DDAPO_DEBUG] layers captured: {len(layers)} of {len(layers)}, the attention layers L_att = decoder '
                f'layers {layers} ({len(layers)} of {total}, counted from 0)') in log, log[-5000:]
        if model_type in LEFT_OUT:
            assert f"L_att is the layers of type 'full_attention' in layer_types ({LEFT_OUT[model_type]} left out)" in log
        else:
            assert "L_att is the layers of type 'full_attention' in layer_types;" in log or \
                'L_att is every decoder layer: the config has no layer_types' in log
        records, means = logged_means(output_dir)
        assert len(means) == 2 and all(math.isfinite(m) and 0.0 <= m <= 1.0 for m in means), means
        assert max(means) - min(means) > 1e-4, f'reward mean is constant: {means}'
        assert all({'ddapo/early/M_V/mean', 'ddapo/late/M_V/mean'} <= set(r) for r in records if 'ddapo/M_V/mean' in r)
        path = 'own/shared' if model_type in OWN_FAMILIES else 'old_logps'
        assert f'[DDAPO] self-check: {path} agrees with eager' in log, log[-5000:]
        if model_type in OWN_FAMILIES:
            assert 'attention read: own (DDAPO_FORWARD=auto, falling back: dropout is active' in log
            self.check_groups(model_type, output_dir, tiny_model_dir(model_type), str(tmp_path))

    @staticmethod
    def check_groups(model_type, output_dir, model_dir, scratch):
        """Under the reward's own forwards each prompt's two outputs share one packed forward (InternVL's defect lived
        there): the first step's rows, before any update, equal naive."""
        import naive_reference
        from conftest import make_policy
        dump = [json.loads(line) for line in open(os.path.join(output_dir, 'dump', 'rank0.jsonl'))][:4]
        assert [r['forwards'] for r in dump] == [2] * 4  # 4 rows, 2 prompts x 2 outputs: one forward per prompt
        policy = make_policy(model_dir, model_type, scratch)
        try:
            naive = [naive_reference.balance_reward(policy, r) for r in dump]
        finally:
            policy.template.remove_post_encode_hook()
        assert [r['reward'] for r in dump] == pytest.approx(naive, abs=1e-5)


PICTURE_TAGS = {'ddapo/train/sample0_image0', 'ddapo/train/sample0_tokens', 'ddapo/train/sample1_image0',
                'ddapo/train/sample1_tokens'}
# the weighted run validates every second step (DDAPO_VALIDATE_STEPS=2): step 2 also has these
VALIDATION_TAGS = {'ddapo/train/validity', 'ddapo/train/sample0_dependency', 'ddapo/train/sample1_dependency'}


def picture_steps(tag):
    return [2] if tag in VALIDATION_TAGS else [1, 2]


def log_records(path, record_class, header_len=None):
    """The records of a tracker's own record log, parsed with its protobuf ``record_class``. wandb and swanlab write
    the same LevelDB-style log (swanlab's reader is the one Python reader of it); ``header_len``: the bytes of a header
    other than swanlab's to skip (wandb's ':W&B', magic, version)."""
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    class Log(DataStoreReader):
        def _read_header(self):
            if header_len is None:
                return super()._read_header()
            self._fp.read(header_len)
            self._index += header_len

    reader = Log()
    reader.open(path)
    try:
        for data in reader:
            record = record_class()
            record.ParseFromString(data)
            yield record
    finally:
        reader.close()


def wandb_images(run_dir):
    """``{tag: [(global step, media path)]}`` of the image-file entries in a wandb offline run's ``run-*.wandb``."""
    from wandb.proto import wandb_internal_pb2
    images = {}
    path = glob.glob(os.path.join(run_dir, 'run-*.wandb'))[0]
    for record in log_records(path, wandb_internal_pb2.Record, header_len=7):
        if record.WhichOneof('record_type') != 'history':
            continue
        fields = {}
        for item in record.history.item:
            keys = [item.key] if item.key else list(item.nested_key)
            fields.setdefault(keys[0], {})[keys[1] if len(keys) > 1 else None] = json.loads(item.value_json)
        step = fields.get('train/global_step', {}).get(None)
        for tag, value in fields.items():
            if tag.startswith('ddapo/') and value.get('_type') == 'image-file':
                images.setdefault(tag, []).append((step, value['path']))
    return images


def swanlab_images(run_dir):
    """``{tag: [(step, media file)]}`` of the image media records in a swanlab local run's ``run-*.swanlab``."""
    from swanlab.proto.swanlab.record.v1 import record_pb2
    images = {}
    for record in log_records(glob.glob(os.path.join(run_dir, 'run-*.swanlab'))[0], record_pb2.Record):
        if record.WhichOneof('record_type') == 'media' and record.media.key.startswith('ddapo/'):
            kind = record.media.DESCRIPTOR.fields_by_name['type'].enum_type.values_by_number[record.media.type].name
            assert kind == 'COLUMN_TYPE_IMAGE', record
            images.setdefault(record.media.key, []).extend(
                (record.media.step, item.filename) for item in record.media.value.items)
    return images


class TestTrackers:
    """--report_to tensorboard wandb swanlab, wandb offline (WANDB_MODE=offline) and swanlab local (--swanlab_mode
    local): the report's pictures reach each tracker through its own image API, as images, under the same tags
    (ddapo/train/sample<k>_{image0,tokens}) on the logging steps 1 and 2, beside the ddapo/* scalars, read back from
    each tracker's own files; the markdown report stays. (The run is TestTokenWeightsRun's weighted one: one real run
    fewer in the suite.)"""

    def test_tensorboard_images(self, runs):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        output_dir, result = runs.result('weighted')
        assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
        events = glob.glob(os.path.join(output_dir, '**', 'events.out.tfevents.*'), recursive=True)
        assert events, 'no TensorBoard event file'
        accumulator = EventAccumulator(os.path.dirname(events[0]), size_guidance={'images': 0})
        accumulator.Reload()
        images = accumulator.Tags()['images']
        assert set(images) == PICTURE_TAGS | VALIDATION_TAGS, images
        for tag in images:
            assert sorted({event.step for event in accumulator.Images(tag)}) == picture_steps(tag), tag
        picture = accumulator.Images('ddapo/train/sample0_image0')[0]
        assert picture.width > 100 and picture.height > 100
        assert any(tag.startswith('train/ddapo/') for tag in accumulator.Tags()['scalars'])
        assert glob.glob(os.path.join(output_dir, '**', 'ddapo', 'report.md'), recursive=True)

    @pytest.mark.parametrize('run_glob, read, media', [
        (('wandb', 'offline-run-*'), wandb_images, ('files',)),
        (('swanlog', 'run-*'), swanlab_images, ('media', 'image')),
    ], ids=['wandb', 'swanlab'])
    def test_tracker_images(self, run_glob, read, media, runs):
        """Read back from the tracker's own record log: each picture an image entry, under the TensorBoard tags."""
        output_dir, result = runs.result('weighted')
        assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
        run_dirs = glob.glob(os.path.join(output_dir, *run_glob))
        assert len(run_dirs) == 1, run_dirs
        images = read(run_dirs[0])
        assert set(images) == PICTURE_TAGS | VALIDATION_TAGS, images
        for tag, entries in images.items():
            assert sorted(step for step, _ in entries) == picture_steps(tag), (tag, entries)
            assert all(os.path.getsize(os.path.join(run_dirs[0], *media, name)) > 1000 for _, name in entries)


class TestValidationRun:
    """DDAPO_VALIDATE_STEPS=2 in a real run (LoRA, image and text-only prompts, 4 steps) against the same run without it
    (TestSwiftRlhfGrpo's 'grpo': same seed and data): every completion is the same, and so is every reward: bit for bit
    on step 1 (both read the old log-prob forward), to 1e-5 from the validation step 2 on (the reward's own forwards
    there, against old_logps, as TestForwardPath compares the two paths; the updates after it differ by as much): the
    extra forward never changes a reward, nor what the run samples next. Steps 2 and 4 log ddapo/validity/* (D > 0, the correlations in [-1, 1],
    n the scored outputs) and write the scatter and the m^V-D plots, steps 1 and 3 none."""

    def test_rewards_unchanged(self, runs):
        dumps = {}
        for name in ('grpo', 'validate_on'):
            output_dir, result = runs.result(name)
            assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
            dumps[name] = [json.loads(line) for line in open(os.path.join(output_dir, 'dump', 'rank0.jsonl'))]
        off, on = dumps['grpo'], dumps['validate_on']
        assert len(off) == len(on) == 16  # 4 steps of 4 rows
        assert [r['response_token_ids'] for r in on] == [r['response_token_ids'] for r in off]
        odd = [i for i in range(16) if (i // 4) % 2 == 0]  # steps 1 and 3
        assert [r['reward'] for r in on[:4]] == [r['reward'] for r in off[:4]]  # step 1, before any difference
        assert [r['reward'] is None for r in on] == [r['reward'] is None for r in off]
        assert [r['reward'] for r in on if r['reward'] is not None] == pytest.approx(
            [r['reward'] for r in off if r['reward'] is not None], abs=1e-5)
        assert all(r['forwards'] == 0 for i, r in enumerate(on) if i in odd)
        assert all(r['forwards'] > 0 for i, r in enumerate(on) if i not in odd)  # the validation steps' own forwards
        assert None in [r['reward'] for r in on] and len({r['reward'] for r in on}) > 3

    def test_metrics_and_report(self, runs):
        output_dir, result = runs.result('validate_on')
        assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
        assert 'DDAPO_VALIDATE_STEPS=2' in result.stdout + result.stderr
        records = [r for r in logged_means(output_dir)[0] if 'global_step/max_steps' in r and 'reward' in r]
        steps = {int(r['global_step/max_steps'].split('/')[0]): r for r in records}
        assert sorted(steps) == [1, 2, 3, 4]
        for step, record in steps.items():
            validity = {k: v for k, v in record.items() if k.startswith('ddapo/validity/')}
            if step % 2:
                assert not validity, (step, validity)
                continue
            assert 1 <= validity['ddapo/validity/n'] <= 4 and validity['ddapo/validity/D/mean'] > 0, validity
            for key in ('ddapo/validity/spearman_output', 'ddapo/validity/spearman_token'):
                assert key not in validity or -1 <= validity[key] <= 1, validity
            # every statistic is either logged or counted as undefined
            assert ('ddapo/validity/spearman_output' in validity) != any(
                k.startswith('ddapo/validity/undefined/spearman_output/') for k in validity), validity
        report = glob.glob(os.path.join(output_dir, '**', 'ddapo'), recursive=True)[0]
        assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(report, '*_validity.png'))) == [
            'step0000002_train_validity.png', 'step0000004_train_validity.png']
        assert glob.glob(os.path.join(report, 'step0000002_train_sample0_dependency.png'))


class TestEverySecondStep:
    """GRPO generating every second step (--steps_per_generation 2: reward calls at global steps 0 and 2), logging and
    validating every second step, with a held-out split evaluated every second step (--val_dataset, --eval_strategy
    steps), 4 steps, the model held fixed (--learning_rate 0). The report and the validation land on the calls that
    hold a logged / N-th step: the report at steps 1 and 3 (the call at step 2 trains steps 3 and 4) and at each
    evaluation (steps 2 and 4, as logging.jsonl numbers them), ddapo/validity/* in the step-4 record (where the trainer
    logs the call at step 2); the held-out evaluation logs
    eval_rewards/DDAPOAttentionORM/mean and eval_ddapo/*; every row, training and held-out, equals naive (fp32, 1e-5);
    the self-check ran on both paths (old_logps on the first training call, own/shared on the first call that ran
    the reward's own forwards) and agreed."""

    def test_run(self, runs, tiny_model_dir, tmp_path):
        import naive_reference
        from conftest import make_policy
        output_dir, result = runs.result('every_second_step')
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-5000:]
        assert '[DDAPO] self-check: old_logps agrees with eager' in log
        assert '[DDAPO] self-check: own/shared agrees with eager' in log
        records, _ = logged_means(output_dir)
        train = {int(r['global_step/max_steps'].split('/')[0]): r for r in records
                 if 'global_step/max_steps' in r and 'loss' in r}
        assert 4 in train and train[4]['ddapo/validity/n'] >= 1 and train[4]['ddapo/validity/D/mean'] > 0, train
        evaluated = [r for r in records if 'eval_rewards/DDAPOAttentionORM/mean' in r]
        assert len(evaluated) == 2 and all(0 <= r['eval_rewards/DDAPOAttentionORM/mean'] <= 1 and
                                           0 < r['eval_ddapo/M_V/mean'] < 1 for r in evaluated), evaluated
        report = glob.glob(os.path.join(output_dir, '**', 'ddapo', 'report.md'), recursive=True)
        assert len(report) == 1
        sections = [line for line in open(report[0]) if line.startswith('## step ')]
        assert sections == ['## step 1 (train)\n', '## step 2 (eval)\n', '## step 3 (train)\n', '## step 4 (eval)\n'], \
            sections  # numbered as logging.jsonl numbers the evaluations (steps 2 and 4)
        assert glob.glob(os.path.join(os.path.dirname(report[0]), 'step0000003_train_validity.png'))
        dump = [json.loads(line) for line in open(os.path.join(output_dir, 'dump', 'rank0.jsonl'))]
        assert sorted({(r['mode'], r['step']) for r in dump}) == [('eval', 2), ('eval', 4), ('train', 0),
                                                                   ('train', 2)]
        scored = [r for r in dump if r['reward'] is not None]
        assert {r['mode'] for r in scored} == {'train', 'eval'} and len(scored) < len(dump)  # held-out text-only rows
        policy = make_policy(tiny_model_dir('qwen2_5_vl'), 'qwen2_5_vl', str(tmp_path))
        try:
            naive = [naive_reference.balance_reward(policy, r) for r in scored]
        finally:
            policy.template.remove_post_encode_hook()
        assert [r['reward'] for r in scored] == pytest.approx(naive, abs=1e-5)


def final_adapter(output_dir):
    from safetensors.torch import load_file
    paths = glob.glob(os.path.join(output_dir, '**', 'checkpoint-2', 'adapter_model.safetensors'), recursive=True)
    assert len(paths) == 1, paths
    return load_file(paths[0])


class TestTokenWeightsRun:
    """DDAPO_TOKEN_WEIGHTS=1 in real runs on image prompts, two optimizer steps each (constant learning rate, the LoRA
    saved at the end; runs stock, unit, weighted): weights held at 1 (DDAPO_TOKEN_WEIGHT_CLIP=1,1) train
    bit for bit as stock ms-swift; the default weights train differently, are applied to every output and log their
    mean/min/max."""

    def test_weights(self, runs):
        import torch
        outputs = {}
        for name in ('stock', 'unit', 'weighted'):
            output_dir, result = runs.result(name)
            assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
            outputs[name] = output_dir
        adapters = {name: final_adapter(path) for name, path in outputs.items()}
        weighted_log = runs.result('weighted')[1].stdout + runs.result('weighted')[1].stderr
        assert '[DDAPO] ms-swift GRPO token-weights patch: applied' in weighted_log
        assert all(torch.equal(adapters['stock'][k], adapters['unit'][k]) for k in adapters['stock'])
        assert not all(torch.equal(adapters['stock'][k], adapters['weighted'][k]) for k in adapters['stock'])

        records, _ = logged_means(outputs['weighted'])
        steps = [r for r in records if 'ddapo/token_weight/mean' in r]
        assert len(steps) == 2, records
        for r in steps:
            assert r['ddapo/token_weight/mean'] == pytest.approx(1.0, abs=1e-6)
            assert 0.2 <= r['ddapo/token_weight/min'] < 1.0 < r['ddapo/token_weight/max'] <= 3.0
            assert r['token_advantage_weights/weighted_frac'] == 1.0
        unit, _ = logged_means(outputs['unit'])
        assert all(r['ddapo/token_weight/min'] == r['ddapo/token_weight/max'] == 1.0
                   for r in unit if 'ddapo/token_weight/min' in r)


def old_logps_records(output_dir):
    """GRPO's old_per_token_logps and completion mask, per micro-batch, as the test hooks dumped them."""
    return [json.loads(line) for line in open(os.path.join(output_dir, 'old_logps.rank0'))]


def steps_of(output_dir):
    """``{step: logged record}`` of the training steps in logging.jsonl."""
    return {int(r['global_step/max_steps'].split('/')[0]): r for r in logged_means(output_dir)[0]
            if 'global_step/max_steps' in r and 'loss' in r}


class TestForwardPath:
    """DDAPO_FORWARD=auto (which takes old_logps here: LoRA with --lora_dropout 0, or full tuning) against own, in the
    same seeded run with ddapo_attention weighted 0 and test_steer steering, two micro-batches per generation,
    text-only rows mixed in, 2 steps; the trainer on sdpa (Qwen2.5-VL, LoRA) and on eager (the hybrid Qwen3.5, full
    tuning). GRPO is unchanged: the old log-probs GRPO recorded and the logged loss are identical bit for bit, step by
    step, and so are the completions. The rewards are the same: every row's reward equals the own path's (1e-5), the
    text-only rows are None on both, and the first step's equal the naive eager computation (fp32, 1e-5). The reward
    ran no forward of its own under old_logps (ddapo/own_forwards 0, > 0 under own), and the log says which path."""

    @pytest.mark.parametrize('implementation', list(FORWARD_PAIRS))
    def test_grpo_unchanged(self, implementation, runs):
        (auto, auto_result), (own, own_result) = (runs.result(f'forward_{p}_{implementation}') for p in ('auto', 'own'))
        for result in (auto_result, own_result):
            assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
        assert "attention read: old_logps (DDAPO_FORWARD=auto)" in auto_result.stderr + auto_result.stdout
        assert "attention read: own (DDAPO_FORWARD=own)" in own_result.stderr + own_result.stdout
        old = [old_logps_records(d) for d in (auto, own)]
        assert len(old[0]) == 4 and old[0] == old[1]  # 2 steps x 2 micro-batches, bit for bit
        steps = [steps_of(d) for d in (auto, own)]
        assert sorted(steps[0]) == [1, 2]
        assert [steps[0][k]['loss'] for k in (1, 2)] == [steps[1][k]['loss'] for k in (1, 2)]
        assert [steps[0][k]['ddapo/own_forwards'] for k in (1, 2)] == [0.0] * 2
        assert all(steps[1][k]['ddapo/own_forwards'] > 0 for k in (1, 2))

    @pytest.mark.parametrize('implementation', list(FORWARD_PAIRS))
    def test_same_rewards(self, implementation, runs, tiny_model_dir, tmp_path):
        from test_reward import naive_reward
        from conftest import make_policy
        from ddapo.core.row import Row
        dumps = [[json.loads(line) for line in open(os.path.join(runs.result(f'forward_{p}_{implementation}')[0],
                                                                 'dump', 'rank0.jsonl'))] for p in ('auto', 'own')]
        auto, own = dumps
        assert len(auto) == len(own) == 16  # 2 steps x 8 completions
        assert [r['response_token_ids'] for r in auto] == [r['response_token_ids'] for r in own]
        assert [r['reward'] is None for r in auto] == [r['reward'] is None for r in own]
        scored = [i for i, r in enumerate(auto) if r['reward'] is not None]
        assert 0 < len(scored) < len(auto)  # image rows scored, text-only rows None
        assert [auto[i]['reward'] for i in scored] == pytest.approx([own[i]['reward'] for i in scored], abs=1e-5)
        assert all(r['forwards'] == 0 for r in auto) and all(r['forwards'] > 0 for r in own)
        model_type = FORWARD_PAIRS[implementation][0]
        policy = make_policy(tiny_model_dir(model_type), model_type, str(tmp_path))
        try:
            first = [i for i in scored if i < 8]
            naive = [naive_reward(policy, Row({'messages': auto[i]['messages'], 'images': auto[i]['images'],
                                               'response_token_ids': auto[i]['response_token_ids']})) for i in first]
        finally:
            policy.template.remove_post_encode_hook()
        assert first and [auto[i]['reward'] for i in first] == pytest.approx(naive, abs=1e-5)


class TestMultiTurnRun:
    """Multi-turn GRPO (docs/notation.md, section 6) in a real swift rlhf run with HF rollouts on Qwen3-VL (also
    TestModelFamilies' run of that family): the zoom scheduler
    through --external_plugins and --multi_turn_scheduler, 3 turns, so every image row's trajectory carries two crops
    (the random model never writes a request: default crops; a parsed request is tested in test_multi_turn). Every
    row's reward equals the naive whole-trajectory computation (fp32, 1e-5), on step 1 read in the old log-prob forward
    and on step 2 (a validation step) in the reward's own forwards; the text-only trajectories are None and counted;
    each output's token weights are one per trained token of its turns, in order, as GRPO's completion mask has them;
    the metrics split M^V between the prompt's image and the crops; the report shows the trajectories turn by turn."""

    def test_rewards_and_weights(self, runs, tiny_model_dir, tmp_path):
        import naive_reference
        from conftest import make_policy
        output_dir, result = runs.result('multi_turn')
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-5000:]
        assert 'attention read: old_logps (DDAPO_FORWARD=auto)' in log
        dump = [json.loads(line) for line in open(os.path.join(output_dir, 'dump', 'rank0.jsonl'))]
        assert len(dump) == 16 and all(len(r['response_token_ids']) == 3 for r in dump)  # 2 steps x 8, 3 turns each
        assert [r['forwards'] for r in dump[:8]] == [0] * 8 and all(r['forwards'] > 0 for r in dump[8:])
        assert all(any(r['images'] for r in rows) for rows in (dump[:8], dump[8:]))  # both paths see trajectories
        imaged = [r for r in dump if r['images']]
        assert imaged and all(len(r['images']) == 3 for r in imaged)  # the prompt's image and two crops
        policy = make_policy(tiny_model_dir('qwen3_vl'), 'qwen3_vl', str(tmp_path))
        try:
            naive = [naive_reference.trajectory_reward(policy, r, details=True) for r in dump]
            labels = [naive_reference.encode_trajectory(policy, r)[2] for r in dump]
        finally:
            policy.template.remove_post_encode_hook()
        assert [r['reward'] is None for r in dump] == [not r['images'] for r in dump]  # text-only trajectories
        assert [r['reward'] for r in imaged] == pytest.approx([n[0] for n, r in zip(naive, dump) if r['images']],
                                                             abs=1e-5)
        for r, (_, details), label in zip(dump, naive, labels):
            if r['images']:  # the first len(w) completion tokens are exactly the rows
                trained = [p for p, value in enumerate(label) if value != -100]
                assert len(r['token_weights']) == len(details['rows']) and trained[:len(details['rows'])] == \
                    details['rows']
        records, means = logged_means(output_dir)
        assert len(means) == 2
        steps = [r for r in records if 'ddapo/M_V_env/mean' in r]
        assert len(steps) == 2 and all(r['ddapo/M_V_env/mean'] > 0 for r in steps)
        assert any(r.get('ddapo/not_applicable/no_vision_keys_frac', 0) > 0 for r in steps)  # counted
        assert all(r['token_advantage_weights/weighted_frac'] > 0 for r in records
                   if 'token_advantage_weights/weighted_frac' in r)
        report = open(glob.glob(os.path.join(output_dir, '**', 'ddapo', 'report.md'), recursive=True)[0]).read()
        assert '**turn 4, generated**' in report and 'environment images' in report
