"""ddapo/* step metrics (ddapo.core.diagnostics) and the report (ddapo.core.report) on synthetic cases with known answers."""
import math
import os

import numpy as np
import pytest
import torch

from ddapo.core.diagnostics import (SampleDiagnostics, segment_attention_entropy, segment_vision_mass, segments,
                                    step_metrics, weight_stats)
from ddapo.core.entropy import AttentionEntropy
from ddapo.core.formulas import head_average, layer_key_attention, sequence_scores
from ddapo.core.report import ReportSample, ReportWriter, TokenGrid, entropy_line, image_heatmaps, token_line

NAN = float('nan')


def scored(m_text, num_text=10, num_vision=30, segment=None):
    return SampleDiagnostics(scores=sequence_scores(torch.tensor(m_text), num_text, num_vision),
                             segment_M_vis=segment or {})


class TestSegments:
    """Edge cases: fewer than 3 layers log only `all`."""

    def test_segments(self):
        assert segments(2) == ['all'] and segments(3) == ['all', 'early', 'middle', 'late']


class TestSegmentVisionMass:
    """Edge cases (the worked example is a doctest): a 2-layer model gives only `all`."""

    def test_two_layers(self):
        assert set(segment_vision_mass(torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]]))) == {'all'}


class TestSegmentAttentionEntropy:
    """Edge cases (the worked example is a doctest): a 2-layer model gives only `all`; each third reads its own layers
    (a third whose layers have no vision mass has ``H~^V`` and ``MDI`` NaN, the others not); ``rows`` leaves rows out."""

    def test_two_layers(self):
        masses, entropies = torch.tensor([[[0.5, 0.5]]] * 2), torch.tensor([[[math.log(2), math.log(2)]]] * 2)
        assert set(segment_attention_entropy(masses, entropies, 2, 2)) == {'all'}

    def test_thirds_and_rows(self):
        # 3 layers, 2 tokens, |T| = |V| = 2; the early layer has no vision mass; token 2 is even on both everywhere
        masses = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]])
        log2 = math.log(2)
        entropies = torch.tensor([[[0.0, NAN], [log2, log2]], [[log2, 0.0], [log2, log2]], [[log2, 0.0], [log2, log2]]])
        values = segment_attention_entropy(masses, entropies, 2, 2)
        assert (values['early'].H_T, values['early'].H_V) == pytest.approx((0.5, 1.0))  # token 1 has no early H~^V
        assert values['late'].MDI == pytest.approx(1 / 1.5)
        first = segment_attention_entropy(masses, entropies, 2, 2, rows=torch.tensor([True, False]))
        assert math.isnan(first['early'].H_V) and math.isnan(first['early'].MDI) and first['early'].H_T == 0.0


class TestEntropyMetrics:
    """``ddapo/<segment>/{MDI,H_T,H_V}/mean``: the mean over the scored outputs where defined; a quantity no output
    defines is not logged; outputs scored without entropies add none, and an unscorable output counts in none."""

    def test_means_and_left_out(self):
        a, b, c = scored([0.5]), scored([0.5]), scored([0.5])
        a.segment_entropy = {'all': AttentionEntropy(0.4, 0.6, 0.9), 'late': AttentionEntropy(NAN, 0.2, NAN)}
        b.segment_entropy = {'all': AttentionEntropy(0.6, 0.2, NAN)}
        metrics = step_metrics([a, b, c, SampleDiagnostics(reason='no_vision_keys')])
        assert metrics['ddapo/all/MDI/mean'] == pytest.approx(0.5) and metrics['ddapo/all/H_T/mean'] == pytest.approx(0.4)
        assert metrics['ddapo/all/H_V/mean'] == pytest.approx(0.9) and metrics['ddapo/late/H_T/mean'] == 0.2
        assert 'ddapo/late/MDI/mean' not in metrics and 'ddapo/late/H_V/mean' not in metrics

    def test_absent_without_entropies(self):
        assert not any('/MDI/' in k or '/H_T/' in k for k in step_metrics([scored([0.5])]))


class TestStepMetrics:
    """Edge cases (the worked example is a doctest): the other means and the per-reason fraction of that example,
    TDR = inf kept out of the mean but in the median, no sample, none scorable."""

    def test_means_over_defined_outputs(self):
        # the doctest's outputs: m^T = 0.25 (TDR 1), m^T = 0.5 (TDR 3), |T| = 10, |V| = 30, and a text-only prompt
        metrics = step_metrics([scored([0.25]), scored([0.5]), SampleDiagnostics(reason='no_vision_keys')])
        assert metrics['ddapo/not_applicable/no_vision_keys_frac'] == pytest.approx(1 / 3)
        assert metrics['ddapo/M_V/mean'] == pytest.approx((0.75 + 0.5) / 2)
        assert metrics['ddapo/num_vision_keys/mean'] == 30 and metrics['ddapo/num_text_keys/mean'] == 10
        assert metrics['ddapo/rho_vis/mean'] == pytest.approx((0.75 + 0.5) / 2 / 30)

    def test_infinite_tdr(self):
        metrics = step_metrics([scored([0.25]), scored([1.0])])  # the second has M^V = 0
        assert metrics['ddapo/tdr/mean'] == pytest.approx(1.0) and metrics['ddapo/tdr/median'] == math.inf

    def test_segments_averaged(self):
        metrics = step_metrics([scored([0.5], segment={'all': 0.2, 'late': 0.4}), scored([0.5], segment={'all': 0.4})])
        assert metrics['ddapo/all/M_V/mean'] == pytest.approx(0.3) and metrics['ddapo/late/M_V/mean'] == 0.4

    def test_empty_and_unscorable(self):
        assert step_metrics([]) == {}
        assert step_metrics([SampleDiagnostics(reason='empty_completion')]) == {
            'ddapo/not_applicable_frac': 1.0, 'ddapo/not_applicable/empty_completion_frac': 1.0}


class TestWeightStats:
    """Edge cases (the worked example is a doctest): a bound equal to 1 never counts as clipped."""

    def test_unit_bound(self):
        assert weight_stats([1.0, 1.0, 3.0], (1.0, 3.0)).at_bounds == 1


class TestTokenWeightMetrics:
    """ddapo/token_weight/*: mean over every weighted token of the step (not per output), min, max, clipped share;
    absent when no output has weights (token weights off)."""

    def test_over_tokens(self):
        a = scored([0.5])
        a.token_weights = weight_stats([1.0, 1.8, 0.2], (0.2, 3.0))
        b = scored([0.5])
        b.token_weights = weight_stats([3.0], (0.2, 3.0))
        metrics = step_metrics([a, b, SampleDiagnostics(reason='no_vision_keys')])
        assert metrics['ddapo/token_weight/mean'] == pytest.approx(6.0 / 4)
        assert (metrics['ddapo/token_weight/min'], metrics['ddapo/token_weight/max']) == (0.2, 3.0)
        assert metrics['ddapo/token_weight/clipped_frac'] == pytest.approx(2 / 4)

    def test_off(self):
        assert not any(k.startswith('ddapo/token_weight/') for k in step_metrics([scored([0.5])]))


class TestImageHeatmaps:
    """Edge cases (the worked examples are doctests): two images split in order; tiles placed row-major, each its own
    block; frames averaged; all vision mass on one key lights exactly that merged patch (through
    layer_key_attention); a count that does not match the grids raises."""

    def test_two_images(self):
        maps = image_heatmaps(torch.arange(16.), [TokenGrid(2, 2), TokenGrid(2, 6)])
        assert [m.shape for m in maps] == [(2, 2), (2, 6)] and maps[1][0, 0] == 4

    def test_tiles(self):
        # 2 x 2 tiles of 1 x 2 tokens: tile k holds 2k, 2k + 1 -> tile 1 right of tile 0, tile 2 under it
        heat = image_heatmaps(torch.arange(8.), [TokenGrid(1, 2, tiles=(2, 2))])[0]
        assert heat.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
        heat = image_heatmaps(torch.arange(4.), [TokenGrid(2, 1, tiles=(1, 2))])[0]
        assert heat.tolist() == [[0, 2], [1, 3]]

    def test_frames_averaged(self):
        heat = image_heatmaps(torch.tensor([0., 2., 4., 6.]), [TokenGrid(1, 2, frames=2)])[0]
        assert heat.tolist() == [[2.0, 4.0]]

    def test_one_patch_lights_up(self):
        text, vision = torch.zeros(20, dtype=torch.bool), torch.zeros(20, dtype=torch.bool)
        text[:4], vision[4:10] = True, True  # 6 vision tokens: a 4 x 6 patch grid merged 2 x 2 -> 2 x 3
        attention = torch.zeros(2, 3, 20)  # [H, rows, S]
        attention[..., 0] = 0.5
        attention[..., 4 + 5] = 0.5  # every head, every generated token: all vision mass on vision token 5
        key_attention = layer_key_attention(head_average(attention), text, vision)
        heat = image_heatmaps(key_attention[vision], [TokenGrid(2, 3)])[0]
        assert heat.shape == (2, 3) and heat[1, 2] == pytest.approx(0.5)
        assert heat.sum() == pytest.approx(0.5) and (heat > 0).sum() == 1

    def test_count_mismatch(self):
        with pytest.raises(ValueError):
            image_heatmaps(torch.arange(5.), [TokenGrid(2, 3)])


class TestEntropyLine:
    """Edge cases (the worked example is a doctest): segments in the order all, early, middle, late whatever the
    dict's order; NaN as ``-``."""

    def test_order(self):
        line = entropy_line({name: AttentionEntropy(0.5, 0.25, 0.125) for name in ('late', 'early', 'all', 'middle')})
        assert line.index(' all ') < line.index(' early ') < line.index(' middle ') < line.index(' late ')
        assert 'late 0.500/0.250/0.125' in line


class TestTokenLine:
    """Edge cases: docstring example, NaN, newline and table pipe escaped."""

    def test_cases(self):
        assert token_line(['Red', '!'], [0.4, 0.31]) == 'Red(0.40) !(0.31)'
        assert token_line(['a\n', '|'], [float('nan'), 0.5]) == 'a\\n(-) \\|(0.50)'


class TestReportWriter:
    """Edge cases: a step section with the metrics table, token line and pictures; a second step appends; the token
    weights line only when the sample has weights."""

    def test_write_and_append(self, tmp_path):
        from PIL import Image
        sample = ReportSample(title='prompt p0', tokens=['Red', '!'], m_vis=[0.4, 0.6], tdr=1.5, reward_balance=0.4,
                              images=[Image.new('RGB', (56, 84), (200, 0, 0))],
                              heatmaps=image_heatmaps(torch.arange(6.), [TokenGrid(2, 3)]))
        writer = ReportWriter(str(tmp_path / 'ddapo'))
        pictures = writer.write_step(5, 'train', {'ddapo/tdr/mean': 1.5}, [sample])
        writer.write_step(10, 'train', {'ddapo/tdr/mean': 1.2}, [])
        text = (tmp_path / 'ddapo' / 'report.md').read_text()
        assert text.index('## step 5 (train)') < text.index('## step 10 (train)')
        assert '| `ddapo/tdr/mean` | 1.5 |' in text and 'Red(0.40) !(0.60)' in text
        assert sorted(pictures) == ['sample0_image0', 'sample0_tokens']
        assert all(os.path.dirname(p) == str(tmp_path / 'ddapo') and os.path.getsize(p) > 1000 for p in pictures.values())
        assert 'step0000005_train_sample0_image0.png' in text
        assert 'advantage weight w per generated token' not in text

    def test_sample_text(self, tmp_path):
        sample = ReportSample(title='sample 1: prompt p0, output 2 of 4', tokens=['red'], m_vis=[0.4], tdr=1.5,
                              reward_balance=0.4, question='<image>What colour?', image_paths=['/d/0001.png'],
                              solution='red', completion='<answer>red</answer>', vision_share=0.5)
        ReportWriter(str(tmp_path)).write_step(3, 'train', {}, [sample, ReportSample(
            title='sample 2', tokens=['x'], m_vis=[0.5], tdr=1.0, reward_balance=0.5, completion='x\ny')])
        text = (tmp_path / 'report.md').read_text()
        assert '### sample 1: prompt p0, output 2 of 4: TDR = 1.5, R^bal = 0.4000' in text
        assert '- question: `<image>What colour?`' in text and '- images: `/d/0001.png`' in text
        assert '- solution: `red`' in text and '- completion: `<answer>red</answer>`' in text
        assert text.count('- solution:') == 1 and '- completion: `x\\ny`' in text and '- images: none' in text

    def test_heatmap_scale_is_fixed(self, tmp_path):
        """Two uniform heat maps of 1 and 2 fair shares get different colours (an auto scale would give both the same)."""
        from PIL import Image
        from ddapo.core.report import render_heatmap
        image = Image.new('RGB', (56, 56), (255, 255, 255))
        colours = []
        for value in (1.0, 2.0):
            path = render_heatmap(image, np.full((2, 2), value), str(tmp_path / f'h{value}.png'), 't')
            picture = np.asarray(Image.open(path).convert('RGB'))
            colours.append(tuple(picture[picture.shape[0] // 2, int(picture.shape[1] * 0.72)]))
        assert colours[0] != colours[1]

    def test_entropy_line(self, tmp_path):
        """The sample's line of attention entropies when it has them, after the completion; none without."""
        entropy = {'all': AttentionEntropy(0.4, 0.6, 0.9), 'early': AttentionEntropy(NAN, 0.5, NAN)}
        with_entropy = ReportSample(title='a', tokens=['x'], m_vis=[0.5], tdr=1.0, reward_balance=0.5, entropy=entropy)
        without = ReportSample(title='b', tokens=['x'], m_vis=[0.5], tdr=1.0, reward_balance=0.5)
        ReportWriter(str(tmp_path)).write_step(1, 'train', {}, [with_entropy, without])
        text = (tmp_path / 'report.md').read_text()
        line = '- attention entropy (Eq. 15-17), MDI / H~T / H~V: all 0.400/0.600/0.900, early -/0.500/-'
        assert text.count('attention entropy') == 1 and line in text
        assert text.index('- completion:') < text.index(line) < text.index('### b')

    def test_token_weights_line(self, tmp_path):
        sample = ReportSample(title='p', tokens=['Red', '!'], m_vis=[0.4, 0.6], tdr=1.5, reward_balance=0.4,
                              token_weights=[1.0, 0.75])
        ReportWriter(str(tmp_path)).write_step(1, 'train', {}, [sample])
        assert 'advantage weight w per generated token: Red(1.00) !(0.75)' in (tmp_path / 'report.md').read_text()
