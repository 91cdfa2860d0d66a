"""The shortcut study (examples/train/grpo/shortcut_study.py) on 2 steps: its data, and one real run of the launcher's
EXPERIMENT=3 on the demo model, through ms-swift's own evaluation, in which the reward-weight warm-up switches at the
stated step. The study itself (about an hour of CPU) runs outside the suite; its numbers are docs/shortcut_study.json."""
import json
import os
import subprocess
import sys

import pytest

from conftest import GRPO_DIR, ROOT

SCRIPT = os.path.join(GRPO_DIR, 'shortcut_study.py')


class TestShortcutRows:
    """Edge cases: the share of rows whose note is right, exactly; the held-out halves (note always right / always
    wrong); grey rows (the note alone tells)."""

    def test_rows(self):
        from shortcut_study import shortcut_rows
        rows = shortcut_rows(20, 0.8, seed=3)
        assert sum(r['note'] == r['solution'] for r in rows) == 16
        assert all(r['note'] != r['solution'] and r['prior'] == 'counter'
                   for r in shortcut_rows(8, 0.0, seed=4, prior='counter'))
        assert sum(r['grey'] for r in shortcut_rows(8, 1.0, seed=5, grey_share=0.5)) == 4


@pytest.mark.slow
class TestStudyOnTwoSteps:
    """One experiment, one seed, 2 GRPO steps with an evaluation before them and after each: the JSON has the
    evaluations with both halves' accuracy and the attention metrics, and the summary; the plot is written; the run
    weighed the rewards with experiment 3's early weights on step 1 (DDAPO_EARLY_STEPS=1) and its --reward_weights on
    step 2, the two weight-0 accuracies included, and said so in its start log."""

    def test_run(self, tmp_path):
        out = tmp_path / 'study'
        result = subprocess.run(
            [sys.executable, SCRIPT, '--output-dir', str(out), '--experiments', '3', '--seeds', '1', '--steps', '2',
             '--eval-steps', '1', '--early-steps', '1', '--warm-steps', '20', '--train-rows', '16',
             '--held-out-rows', '8', '--json', str(out / 'study.json'), '--plot', str(out / 'study.png')],
            capture_output=True, text=True, timeout=900, cwd=ROOT,
            env={**{k: v for k, v in os.environ.items() if not k.startswith('DDAPO_')}, 'HF_HUB_OFFLINE': '1'})
        log = open(out / 'experiment3_seed1' / 'run.log').read() if (out / 'experiment3_seed1' / 'run.log').exists() \
            else ''
        assert result.returncode == 0, (result.stdout + result.stderr + log)[-5000:]
        study = json.load(open(out / 'study.json'))
        evaluations = study['evaluations']['3']['1']
        assert [e['step'] for e in evaluations] == [0, 1, 2]
        for evaluation in evaluations:
            assert 0 <= evaluation['in-prior accuracy'] <= 1 and 0 <= evaluation['counter-prior accuracy'] <= 1
            assert 0 < evaluation['M_V'] < 1 and 0 < evaluation['R^bal'] < 1
        assert set(study['summary']['3']) == {'start', 'end', 'counter-prior accuracy change'}
        weights = study['reward_weights']['experiment3_seed1']
        assert [w['ddapo/reward_weight/AnswerMatchORM'] for w in weights] == [1.0, 2.5]
        assert [w['ddapo/reward_weight/Format'] for w in weights] == [2.0, 0.5]
        assert {w['ddapo/reward_weight/CounterPriorAccuracy'] for w in weights} == {0.0}
        assert '[DDAPO] reward-weight warm-up: steps 1..1 weigh the rewards' in log
        assert 'DDAPO_REWARD=group' in log and '--soft_cache_length 3' in log
        assert (out / 'study.png').exists()
