"""Two real processes (torchrun, gloo, CPU): every rank runs the same number of reward forwards."""
import json
import re
import os
import subprocess
import sys

import pytest

from conftest import ROOT

WORKER = os.path.join(ROOT, 'tests', 'lockstep_worker.py')
pytestmark = pytest.mark.slow  # torchrun, two processes


class TestLockstep:
    """Edge cases: unequal row counts and unequal scorable counts (a text-only row); a rank with no rows at
    all (padding forward from a minimal row); the first call's self-check, whose eager forwards differ per rank and
    are padded in step too; metrics gathered over both ranks; DDAPO_REWARD=group with a
    prompt's outputs split over the ranks; bounded time (no hang)."""

    def test_two_ranks(self, tiny_model_dir, tmp_path):
        model_dir = tiny_model_dir('qwen2_5_vl')
        env = {k: v for k, v in os.environ.items() if not k.startswith('DDAPO_')}
        env.update(HF_HUB_OFFLINE='1', PYTHONPATH=os.pathsep.join([os.path.join(ROOT, 'tests'),
                                                    os.path.join(ROOT, 'tests', 'cpu_distributed'), env.get('PYTHONPATH', '')]))
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
               WORKER, model_dir, str(tmp_path)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
        # two processes share stdout: their lines may run together, so each record is decoded where it starts
        decoder = json.JSONDecoder()
        results = [decoder.raw_decode(result.stdout, m.end())[0] for m in re.finditer('RESULT ', result.stdout)]
        by_case = {}
        for r in results:
            by_case.setdefault(r['case'], {})[r['rank']] = r
        unequal = by_case['unequal']
        # the reward's 3 forwards each (rank 1: 2 and a padding one), then the self-check's eager forwards, in step too:
        # rank 0 checks its 3 outputs, rank 1 its one scorable output and pads to 3
        assert unequal[0]['forwards'] == unequal[1]['forwards'] == 3 + 3
        assert unequal[1]['rewards'][1] is None and None not in unequal[0]['rewards']
        for rank in (0, 1):  # gathered over both ranks: 1 of 5 outputs is not applicable
            assert abs(unequal[rank]['metrics']['ddapo/not_applicable_frac'] - 0.2) < 1e-9
        empty = by_case['one_rank_empty']
        assert empty[0]['forwards'] == empty[1]['forwards'] == 2 and empty[1]['rewards'] == []
        # DDAPO_REWARD=group over a prompt whose outputs are split across the ranks: Eq. (8) on all four, as the suite
        # writes it (tests/naive_reference.py)
        import naive_reference
        balance = by_case['split_balance'][0]['rewards'] + by_case['split_balance'][1]['rewards']
        expected = naive_reference.group_rewards(balance, ['shared'] * 4)
        got = by_case['split_group'][0]['rewards'] + by_case['split_group'][1]['rewards']
        assert got == pytest.approx(expected, abs=1e-6) and any(abs(g) > 1e-3 for g in got)
