"""``benchmark_ddapo_reward.py --smoke``: the benchmark runs end to end on the CPU and its paths agree."""
import json
import os
import subprocess
import sys

import pytest

from conftest import GRPO_DIR


@pytest.mark.slow
class TestBenchmarkSmoke:
    """Edge cases: the JSON document has every measurement (the validation step's too, with its D_i, and the old
    log-prob micro-batch with and without the capture), and the reward paths agree with the naive computation and
    with each other, with and without validation, read inside the micro-batch forward too (fp32, 1e-5)."""

    def test_smoke(self, tmp_path):
        output = tmp_path / 'bench.json'
        subprocess.run([sys.executable, os.path.join(GRPO_DIR, 'benchmark_ddapo_reward.py'), '--smoke', '--output',
                        str(output)], check=True, capture_output=True, timeout=300)
        document = json.loads(output.read_text())
        result, = document['results']
        assert set(result['per_output']) == {'plain_sdpa', 'naive_eager_all_attentions', 'reward_eager', 'reward_rows',
                                             'reward_rows_validate'}
        assert set(result['per_group']) == {'plain_sdpa_x3', 'reward_eager_x3', 'reward_rows_x3', 'reward_shared',
                                            'reward_shared_validate', 'old_logps_forward', 'old_logps_forward_captured'}
        assert result['ratios']['old_logps_capture_time_vs_forward'] > 0
        assert result['ratios']['validate_shared_time_vs_shared'] > 0
        assert len(result['dependency_shared']) == 3 and min(result['dependency_shared']) > 0
        assert all(entry['ms'] > 0 for entry in {**result['per_output'], **result['per_group']}.values())
        assert max(result['max_reward_diff'].values()) < 1e-5
        assert len(set(result['rewards_eager'])) == 3  # the outputs' rewards differ, so agreement means something
