"""Real DeepSpeed ZeRO-3 and ZeRO-2 on CPU: `swift rlhf --deepspeed zero3|zero2` with two processes on one node, and
ZeRO-3 on two nodes of one process each, with DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) and gloo, on image
and text-only prompts, so the ranks have unequal scorable rows and unequal forwards, and one of them runs padding
forwards.

The only help DeepSpeed needs on CPU is `tests/cpu_distributed/sitecustomize.py` (put on PYTHONPATH): transformers
builds accelerate's state for a DeepSpeed run without a backend (it passes --ddp_backend only without DeepSpeed), so
without an accelerator accelerate counted one process and DeepSpeed stopped at its batch arithmetic
(`train_batch_size ... 2 != 2 * 1 * 2`; `--use_cpu true --ddp_backend gloo` gets past transformers, and DeepSpeed
then counts one process itself). The launcher refuses that setup at start. ms-swift's fp16 default is turned off
(`--fp16 false`): DeepSpeed's CPU accelerator has no fp16.
"""
import glob
import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import ROOT, make_policy
from test_swift_rlhf_e2e import logged_means, swift_command

pytestmark = pytest.mark.slow  # real swift rlhf runs
SHIM = os.path.join(ROOT, 'tests', 'cpu_distributed')
# A pack budget between the two prompt kinds' packs (2 outputs of 8 tokens): a text-only prompt's outputs run as one
# forward (34 + 16 tokens), an image prompt's as two (48 + 16 > 60), so ranks holding different kinds run unequal
# numbers of forwards, and the one with fewer runs a padding forward.
PACK_TOKENS = '60'


@pytest.fixture(scope='module')
def alternating_dataset(tmp_path_factory):
    from tiny_qwen_vl import build_shapes_dataset
    return build_shapes_dataset(str(tmp_path_factory.mktemp('alternating')), num_rows=8, text_only_every=2)


def launch(model_dir, dataset, output_dir, stage, port, env_extra):
    cmd = swift_command(model_dir, dataset, output_dir, '--deepspeed', stage, '--fp16', 'false', '--bf16', 'false',
                        '--per_device_train_batch_size', '2', '--max_steps', '3', hooks=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith('DDAPO_')}
    env.update(HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1', NPROC_PER_NODE='2', MASTER_PORT=str(port),
               DS_ACCELERATOR='cpu', DDAPO_PACK_TOKENS=PACK_TOKENS,
               PYTHONPATH=os.pathsep.join([SHIM, env.get('PYTHONPATH', '')]), **env_extra)
    log = open(os.path.join(output_dir, 'run.log'), 'w')
    # a session of its own, so a hung run is killed with all its ranks
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log.name


def kill(process):
    """The run and every process under it (torch's launcher puts the ranks in sessions of their own)."""
    import psutil
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    psutil.wait_procs(tree, timeout=10)


def dumped_rows(dump_dir, rank):
    return [json.loads(line) for line in open(os.path.join(dump_dir, f'rank{rank}.jsonl'))]


class TestZero:
    """ZeRO-3 and ZeRO-2, two CPU processes: the run finishes, the rewards are logged, and the first step's rewards
    (taken before any update) equal what the same rows score in one process with the reward's own forward (fp32,
    1e-5). ZeRO-3 reads attention inside the old log-prob forward (DDAPO_FORWARD=auto) and validates every second
    step (DDAPO_VALIDATE_STEPS=2): on steps 1 and 3 no rank runs a forward of its own (no padding either); on step
    2 the reward runs its own forwards (the validity pair), and a rank runs padding forwards so that the ranks' totals
    are equal. ZeRO-2 runs the reward's own forwards (DDAPO_FORWARD=own): no padding forwards, while the ranks'
    forward counts differ. Edge case: text-only rows (None) on one rank while the other scores images."""

    @pytest.mark.parametrize('stage, port', [('zero3', 29541), ('zero2', 29543)])
    def test_run(self, stage, port, tiny_model_dir, alternating_dataset, tmp_path):
        model_dir = tiny_model_dir('qwen2_5_vl')
        dump = str(tmp_path / 'dump')
        # ZeRO-3 validates every second step: the masked-prompt forwards count in the lockstep (two per unit)
        validate = {'DDAPO_VALIDATE_STEPS': '2'} if stage == 'zero3' else {'DDAPO_FORWARD': 'own'}
        process, log_path = launch(model_dir, alternating_dataset, str(tmp_path), stage, port,
                                   {'TEST_DDAPO_DUMP_DIR': dump, **validate})
        try:
            process.wait(timeout=400)
        finally:
            kill(process)
        log = open(log_path).read()
        assert process.returncode == 0, log[-5000:]
        assert f"'stage': {stage[-1]}" in log, log[-5000:]
        calls = {rank: dumped_rows(dump, rank) for rank in (0, 1)}
        padding = [row['padding_forwards'] for rank in (0, 1) for row in calls[rank]]
        if stage == 'zero3':  # a forward gathers the sharded parameters: the ranks run as many forwards
            assert sum(padding) > 0, 'no rank ran a padding forward: the test would not show the lockstep'
            assert len(calls[0]) == len(calls[1]) == 6, calls  # 2 rows per rank and step
            for k in range(3):
                rows = calls[0][2 * k:2 * k + 2] + calls[1][2 * k:2 * k + 2]
                if k == 1:  # step 2 validates: each unit and each padding unit is two forwards, the totals equal
                    assert all(row['forwards'] % 2 == 0 and row['padding_forwards'] % 2 == 0 for row in rows)
                    assert rows[0]['forwards'] + rows[0]['padding_forwards'] == \
                        rows[2]['forwards'] + rows[2]['padding_forwards'], rows
                    assert all(row['validity_metrics']['ddapo/validity/n'] >= 1 for row in rows)
                else:  # read inside the old log-prob forward: no forward of the reward's own, no padding
                    assert all(row['forwards'] == row['padding_forwards'] == 0 for row in rows), rows
        else:  # ZeRO-2 does not shard parameters: each rank runs its own forwards, and the run does not hang
            assert sum(padding) == 0, padding
            forwards = [(r0['forwards'], r1['forwards']) for r0, r1 in zip(calls[0], calls[1])]
            assert any(a != b for a, b in forwards), f'the ranks always ran as many forwards: {forwards}'
        _, means = logged_means(str(tmp_path))
        assert means and all(0.0 <= m <= 1.0 for m in means), means
        assert_rescored(model_dir, dump, str(tmp_path / 'one_process'))


def assert_rescored(model_dir, dump, output_dir):
    """The first step's rewards of both ranks (taken before any update) equal what the same rows score in this
    process (fp32, 1e-5); both kinds of rows occur (text-only: None)."""
    from ddapo.reward import DDAPOAttentionORM
    policy = make_policy(model_dir, 'qwen2_5_vl', output_dir)
    try:
        for rank in (0, 1):
            first_step = dumped_rows(dump, rank)[:2]  # 2 rows per rank and step
            columns = {k: [row[k] for row in first_step] for k in ('messages', 'images', 'response_token_ids')}
            columns['prompt_id'] = [f'p{i}' for i in range(len(first_step))]
            expected = DDAPOAttentionORM()([''] * len(first_step), trainer=policy, **columns)
            assert [row['reward'] for row in first_step] == pytest.approx(expected, abs=1e-5)
    finally:
        policy.template.remove_post_encode_hook()
    scored = [row['reward'] for rank in (0, 1) for row in dumped_rows(dump, rank)]
    assert None in scored and any(r is not None for r in scored)  # text-only and image rows


def launch_two_nodes(model_dir, dataset, tmp_path, port, env_extra):
    """Two `swift rlhf` processes with NNODES=2, NODE_RANK 0 and 1, MASTER_ADDR=127.0.0.1, one process each (as
    run_grpo_with_ddapo.sh exports them, and ms-swift's launcher hands them to torchrun), ZeRO-3 over gloo; returns
    the processes and their log paths."""
    nodes, logs = [], []
    for rank in (0, 1):
        node_dir = tmp_path / f'node{rank}'
        node_dir.mkdir()
        cmd = swift_command(model_dir, dataset, str(node_dir), '--deepspeed', 'zero3', '--fp16', 'false', '--bf16',
                            'false', '--per_device_train_batch_size', '2', '--max_steps', '3', hooks=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith('DDAPO_') and k != 'NPROC_PER_NODE'}
        env.update(HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1', NNODES='2', NODE_RANK=str(rank),
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), DS_ACCELERATOR='cpu',
                   DDAPO_PACK_TOKENS=PACK_TOKENS, PYTHONPATH=os.pathsep.join([SHIM, env.get('PYTHONPATH', '')]),
                   **env_extra)
        logs.append(str(node_dir / 'run.log'))
        nodes.append(subprocess.Popen(cmd, stdout=open(logs[-1], 'w'), stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
    return nodes, logs


def wait_all(nodes, timeout):
    """Wait for every process within ``timeout`` seconds in all; then kill whatever is left."""
    deadline = time.monotonic() + timeout
    try:
        for node in nodes:
            node.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for node in nodes:
            kill(node)


class TestTwoNodes:
    """Two nodes of one process each, on loopback (`launch_two_nodes`), image and text-only prompts mixed. Both nodes
    finish; the attention is read inside the old log-prob forward, so no rank runs a forward of its own or a padding
    forward; and the first step's rewards equal one-process re-scoring with the reward's own forward (1e-5)."""

    def test_two_nodes(self, tiny_model_dir, alternating_dataset, tmp_path):
        model_dir = tiny_model_dir('qwen2_5_vl')
        dump = str(tmp_path / 'dump')
        nodes, logs = launch_two_nodes(model_dir, alternating_dataset, tmp_path, 29549, {'TEST_DDAPO_DUMP_DIR': dump})
        wait_all(nodes, 400)
        texts = [open(path).read() for path in logs]
        for node, text in zip(nodes, texts):
            assert node.returncode == 0, text[-5000:]
        assert "'stage': 3" in texts[0] and '--nnodes 2' in texts[0] and '--node_rank 1' in texts[1], texts[1][:3000]
        calls = {rank: dumped_rows(dump, rank) for rank in (0, 1)}  # global ranks 0 (node 0) and 1 (node 1)
        assert all(row['forwards'] == row['padding_forwards'] == 0 for rank in (0, 1) for row in calls[rank])
        assert 'attention read: old_logps (DDAPO_FORWARD=auto)' in texts[0]
        _, means = logged_means(str(tmp_path / 'node0'))
        assert means and all(0.0 <= m <= 1.0 for m in means), means
        assert_rescored(model_dir, dump, str(tmp_path / 'one_process'))


class TestStopsOnEveryRank:
    """DDAPO_STRICT=1 on two nodes (ZeRO-3, the reward's own forwards, so its forward-count agreement and collective
    forwards run in between): the first text-only row is met by one rank only, and both processes stop, each with
    the same error naming that rank, within a bounded time. Before the error went through the call's gather, the
    other rank waited in the gather for a rank that had raised."""

    def test_one_rank_meets_the_error(self, tiny_model_dir, alternating_dataset, tmp_path):
        nodes, logs = launch_two_nodes(tiny_model_dir('qwen2_5_vl'), alternating_dataset, tmp_path, 29551,
                                       {'DDAPO_STRICT': '1', 'DDAPO_FORWARD': 'own'})
        started = time.monotonic()
        wait_all(nodes, 300)
        assert time.monotonic() - started < 300, 'a node did not stop'
        texts = [open(path).read() for path in logs]
        messages = []
        for node, text in zip(nodes, texts):
            assert node.returncode not in (0, None, -signal.SIGKILL), text[-3000:]
            found = [line[line.index('ddapo_attention stopped'):] for line in text.splitlines()
                     if 'RuntimeError: ddapo_attention stopped the run on every rank: ' in line]
            assert found, text[-5000:]
            messages.append(found[0])
        assert messages[0] == messages[1], messages  # both ranks stopped with the same decision
        assert len(re.findall(r'rank \d+: ', messages[0])) == 1, messages[0]  # one rank met it
        assert 'DDAPO_STRICT=1' in messages[0] and 'no_vision_keys' in messages[0]


def rank_processes(process):
    """The rank processes under a launched run (torchrun's children with LOCAL_RANK in their environment)."""
    import psutil
    ranks = []
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            if 'LOCAL_RANK' in child.environ() and 'swift' in ' '.join(child.cmdline()):
                ranks.append(child)
        except psutil.Error:
            pass
    return ranks


def current_stacks(stacks_dir, ranks, count):
    """Ask every rank for its stacks (SIGUSR1, tests/plugins: TEST_DDAPO_STACKS) and return each rank's ``count``-th
    dump of the thread that received the signal, the main thread: ``{rank: [frames]}``."""
    for rank in ranks:
        rank.send_signal(signal.SIGUSR1)
    time.sleep(3)
    stacks = {}
    for path in sorted(glob.glob(os.path.join(stacks_dir, 'stacks.rank*'))):
        dumps = [block for block in open(path).read().split('Current thread')[1:]]
        if len(dumps) >= count:
            frames = dumps[count - 1].split('\n\n')[0].splitlines()[1:]
            stacks[os.path.basename(path)] = [frame.strip() for frame in frames if frame.strip().startswith('File')]
    return stacks


class TestLockstepCanFail:
    """The same ZeRO-3 run, with the reward's own forwards (DDAPO_FORWARD=own) and the padding forwards skipped
    (TEST_DDAPO_SKIP_PADDING=1 of tests/plugins), hangs: the rank with fewer forwards waits in a collective that the
    other never joins. Detected positively: after the skip, each rank's Python stack is dumped twice, 8 s apart (a
    healthy step takes about 2 s)
    (faulthandler on SIGUSR1, TEST_DDAPO_STACKS); both ranks' main threads are where they were, and they wait inside
    torch.distributed collectives. A slow healthy run would show progress between the dumps. The run is then killed."""

    def test_hangs_without_padding(self, tiny_model_dir, alternating_dataset, tmp_path):
        stacks_dir = str(tmp_path / 'stacks')
        process, log_path = launch(tiny_model_dir('qwen2_5_vl'), alternating_dataset, str(tmp_path), 'zero3', 29545,
                                   {'TEST_DDAPO_SKIP_PADDING': '1', 'DDAPO_FORWARD': 'own',
                                    'TEST_DDAPO_STACKS': stacks_dir})
        first = second = None
        try:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline and process.poll() is None:
                if 'TEST_DDAPO_SKIP_PADDING=1: skipping' in open(log_path).read():
                    break
                time.sleep(1)
            time.sleep(5)  # the ranks reach their collectives
            ranks = rank_processes(process)
            if process.poll() is None and len(ranks) == 2:
                first = current_stacks(stacks_dir, ranks, 1)
                time.sleep(5)  # a healthy step of this model takes about 2 s
                second = current_stacks(stacks_dir, ranks, 2)
            finished = process.poll() is not None
        finally:
            kill(process)
        log = open(log_path).read()
        assert 'TEST_DDAPO_SKIP_PADDING=1: skipping' in log, log[-5000:]
        assert not finished, f'the run ended (rc {process.returncode}) although a rank skipped its padding forward'
        assert first and len(first) == 2 and first == second, (first, second)  # no progress on either rank
        assert all(any('torch/distributed/' in frame for frame in frames) for frames in first.values()), first
        assert 'End time of running main' not in log
