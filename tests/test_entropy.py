"""Attention entropy per modality and the modality diversity index (docs/notation.md section 7, Eq. 15-17;
ddapo.core.entropy): the pure formulas on hand-computed cases, the capture's entropies (`LayerCapture.entropies`) on
synthetic probabilities, chunks and a trajectory's selected rows, and on the tiny Qwen2.5-VL (q/k sharpened, so that
tokens and layers differ) against the eager model's ``output_attentions`` (tests/naive_reference.py) on every path: the
reward's own forwards (shared, rows, eager) and the capture inside the old log-prob forward; the rewards do not read
them (bit for bit), and the step's metrics hold them once `score_output` gets them."""
import contextlib
import math

import pytest
import torch

import naive_reference
from ddapo.core.config import DDAPOConfig
from ddapo.core.entropy import (diversity_index, layer_mean, layer_modality_entropies, modality_entropy,
                                output_entropy, token_entropies)
from ddapo.core.key_sets import KeySets
from ddapo.core.scorer import RowKeys, score_output
from ddapo.engine.capture import LayerCapture
from test_reward import COMPLETIONS, reward_kwargs, rows_of

NAN = float('nan')


def entropy_of(probabilities):
    """``-sum p log p`` of a list (``0 log 0 = 0``), written here."""
    return -sum(p * math.log(p) for p in probabilities if p > 0)


def within(row, keys):
    """The entropy (nats) of one row of head-mean probabilities renormalised over the key positions ``keys``."""
    total = sum(row[j] for j in keys)
    return entropy_of([row[j] / total for j in keys])


def nan_equal(actual, expected, tol):
    """Equal within ``tol`` where both are numbers, and NaN at the same places."""
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), (actual, expected)
    defined = ~torch.isnan(actual)
    assert torch.allclose(actual[defined], expected[defined], atol=tol, rtol=0), (actual, expected)


# ---------------------------------------------------------------------------------------------------------------
# the pure functions

class TestLayerModalityEntropies:
    """Edge cases (the worked example is a doctest): zero probabilities add 0 (``0 log 0``), a key in neither set
    counts in neither, several rows, the Eq. (1) masses passed in or computed give the same, a set without mass (or
    without keys) and a mass below ``2^-126`` are NaN; a small mass keeps float32's precision (no cancellation of
    ``log m`` against ``sum h log h / m``)."""

    def test_rows_and_keys(self):
        head_mean = torch.tensor([[0.1, 0.0, 0.3, 0.6], [0.25, 0.25, 0.25, 0.25]])
        text, vision = torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.tensor([0, 0, 1, 0], dtype=torch.bool)
        entropies = layer_modality_entropies(head_mean, text, vision)  # key 3 is in neither set
        rows = head_mean.double().tolist()
        nan_equal(entropies, [[within(row, [0, 1]), within(row, [2])] for row in rows], 1e-7)
        assert entropies[1, 0] == pytest.approx(math.log(2), abs=1e-7) and entropies[0, 0] == 0.0
        masses = head_mean @ torch.stack([text, vision], 1).float()
        assert torch.equal(layer_modality_entropies(head_mean, text, vision, masses), entropies)

    def test_no_mass(self):
        head_mean = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5 - 1e-39, 1e-39]])
        text, vision = torch.tensor([True, True, False]), torch.tensor([False, False, True])
        entropies = layer_modality_entropies(head_mean, text, vision)
        assert torch.isnan(entropies[:, 1]).all() and entropies[:, 0].tolist() == pytest.approx([math.log(2)] * 2)
        empty = layer_modality_entropies(head_mean, text, torch.zeros(3, dtype=torch.bool))
        assert torch.isnan(empty[:, 1]).all()

    def test_small_mass(self):
        # 1e-12 of the row on 16 vision keys, unevenly (as a sharpened layer's text-bound token): float32 input, the
        # entropy within 2e-7 nats of the float64 one of the same numbers (log m - s / m: about 2e-6 off here)
        generator = torch.Generator().manual_seed(0)
        weights = torch.rand(16, generator=generator, dtype=torch.float64) ** 4
        head_mean = torch.zeros(1, 17, dtype=torch.float64)
        head_mean[0, 0], head_mean[0, 1:] = 1 - 1e-12, 1e-12 * weights / weights.sum()
        head_mean = head_mean.float()
        text = torch.zeros(17, dtype=torch.bool)
        text[0] = True
        expected = within(head_mean[0].double().tolist(), range(1, 17))
        assert float(layer_modality_entropies(head_mean, text, ~text)[0, 1]) == pytest.approx(expected, abs=2e-7)


class TestModalityEntropy:
    """Edge cases (the worked example is a doctest): a non-uniform spread against the definition; the value does not
    grow with ``|X|`` (uniform over 3 or 3000 keys is 1); ``|X| = 1``, ``|X| = 0``, no mass, a mass below
    ``|X| 2^-126``, an unfilled (NaN) layer are NaN, a mass just above it is not; a rounding error outside
    ``[0, log |X|]`` is rounded back; per-row counts (a trajectory) over layers."""

    def test_against_definition(self):
        q = [0.5, 0.25, 0.25]
        value = modality_entropy(torch.tensor([0.3]), torch.tensor([entropy_of(q)]), 3)
        assert float(value) == pytest.approx(entropy_of(q) / math.log(3), abs=1e-6)

    @pytest.mark.parametrize('keys', [3, 3000])
    def test_uniform_is_one(self, keys):
        value = modality_entropy(torch.tensor([0.2]), torch.tensor([math.log(keys)], dtype=torch.float64), keys)
        assert float(value) == pytest.approx(1.0, abs=1e-12)

    def test_undefined(self):
        tiny = 2.0 ** -126
        mass = torch.tensor([0.5, 0.5, 0.0, 0.5, 4.0 * tiny * 0.99, 4.0 * tiny * 1.01], dtype=torch.float64)
        entropy = torch.tensor([0.5, 0.5, 0.5, NAN, 0.5, 0.5], dtype=torch.float64)
        values = modality_entropy(mass, entropy, torch.tensor([1, 0, 4, 4, 4, 4]))
        nan_equal(values, [NAN] * 5 + [0.5 / math.log(4)], 1e-12)

    def test_rounded_into_range(self):
        values = modality_entropy(torch.tensor([0.5, 0.5]), torch.tensor([-1e-7, math.log(4) + 1e-6]), 4)
        assert values.tolist() == [0.0, 1.0]

    def test_per_row_counts_over_layers(self):
        # 2 layers, 2 rows seeing 2 and 4 keys; each row's mass spread evenly over 2 keys
        values = modality_entropy(torch.full((2, 2), 0.4), torch.full((2, 2), math.log(2)), torch.tensor([2, 4]))
        nan_equal(values, [[1.0, 0.5]] * 2, 1e-7)


class TestDiversityIndex:
    """Edge cases (the worked example is a doctest): 0 when the text attention is on one key and the vision one is
    spread, 1 the other way round; both 0, or either NaN (both orders), is NaN."""

    def test_cases(self):
        assert (diversity_index(0.0, 0.7), diversity_index(0.6, 0.0)) == (0.0, 1.0)
        assert all(math.isnan(diversity_index(a, b)) for a, b in [(0.0, 0.0), (NAN, 0.3), (0.2, NAN)])


class TestLayerMean:
    """Edge cases (the worked example is a doctest): nothing defined is NaN, a 1-D input gives a number, no layer
    at all is NaN."""

    def test_cases(self):
        assert math.isnan(float(layer_mean(torch.tensor([NAN, NAN], dtype=torch.float64))))
        assert float(layer_mean(torch.tensor([0.2, NAN, 0.6], dtype=torch.float64))) == pytest.approx(0.4)
        assert torch.isnan(layer_mean(torch.zeros(0, 3, dtype=torch.float64))).all()


class TestOutputEntropy:
    """Edge cases (the worked example is a doctest): a layer with no vision mass is left out of that token's ``H~^V``
    but kept in its ``H~^T``; a token with no defined layer is left out of the output's mean; ``MDI_i`` is the ratio
    of the output's means, not the mean of per-token ratios; ``rows`` restricts the mean; no row, or ``|V| = 1``, gives
    NaN; `token_entropies` per token."""

    def test_layer_and_token_left_out(self):
        # |T| = |V| = 2; token 1: layer 1 even on T (1) and on one V key (0), layer 2 no vision mass, one T key (0);
        # token 2: no layer has vision mass, T even in layer 2 (1), on one key in layer 1 (0)
        masses = torch.tensor([[[0.5, 0.2], [0.4, 0.0]], [[0.6, 0.0], [0.6, 0.0]]])
        log2 = math.log(2)
        entropies = torch.tensor([[[log2, 0.0], [0.0, NAN]], [[0.0, NAN], [log2, NAN]]], dtype=torch.float64)
        nan_equal(token_entropies(masses, entropies, 2, 2), [[0.5, 0.5], [0.0, NAN]], 1e-6)
        e = output_entropy(masses, entropies, 2, 2)
        assert (e.H_T, e.H_V) == pytest.approx((0.5, 0.0), abs=1e-6) and e.MDI == pytest.approx(1.0)
        only_second = output_entropy(masses, entropies, 2, 2, rows=torch.tensor([False, True]))
        assert math.isnan(only_second.MDI) and math.isnan(only_second.H_V) and only_second.H_T == pytest.approx(0.5)

    def test_ratio_of_means(self):
        # 2 tokens, 1 layer, |T| = |V| = 4: (H~^T, H~^V) = (1, 0) and (1, 1); the mean of the per-token ratios would be
        # (1 + 0.5) / 2 = 0.75, the ratio of the means is 1 / (1 + 0.5)
        masses = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
        entropies = torch.tensor([[[math.log(4), 0.0], [math.log(4), math.log(4)]]])
        e = output_entropy(masses, entropies, 4, 4)
        assert (e.H_T, e.H_V) == pytest.approx((1.0, 0.5)) and e.MDI == pytest.approx(2 / 3)

    def test_undefined_output(self):
        masses, entropies = torch.tensor([[[0.5, 0.5]]]), torch.tensor([[[math.log(2), 0.0]]])
        e = output_entropy(masses, entropies, 2, 1)
        assert math.isnan(e.MDI) and math.isnan(e.H_V) and e.H_T == pytest.approx(1.0, abs=1e-6)
        e = output_entropy(masses, entropies, 2, 2, rows=torch.tensor([False]))
        assert all(math.isnan(v) for v in (e.MDI, e.H_T, e.H_V))


class TestScoreOutputEntropy:
    """`score_output` with ``entropies``: the same reward and M^V segments as without (the entropies are never read by
    the reward), the segments' values (Eq. 17); without the keyword, none; a trajectory averages over the rows that
    see both kinds of key, with each row's counts."""

    def test_reward_unchanged_and_values(self):
        # 3 layers, 1 token, |T| = 2, |V| = 4: the doctest of segment_attention_entropy
        masses = torch.tensor([[[0.5, 0.4]]] * 3)
        entropies = torch.tensor([[[math.log(2), math.log(k)]] for k in (1, 2, 4)])
        plain = score_output(masses, [0, 1, 2], 2, 4)
        scored = score_output(masses, [0, 1, 2], 2, 4, entropies=entropies)
        assert scored.reward == plain.reward and scored.diagnostics.segment_M_vis == plain.diagnostics.segment_M_vis
        assert plain.diagnostics.segment_entropy == {}
        entropy = scored.diagnostics.segment_entropy
        assert sorted(entropy) == ['all', 'early', 'late', 'middle']
        assert (entropy['early'].MDI, entropy['early'].H_V) == pytest.approx((1.0, 0.0), abs=1e-6)
        assert entropy['all'].H_V == pytest.approx(0.5, abs=1e-6)
        assert entropy['all'].MDI == pytest.approx(1 / 1.5, abs=1e-6)

    def test_not_applicable_has_none(self):
        scored = score_output(torch.tensor([[[0.5, 0.5]]]), [0], 2, 0, entropies=torch.zeros(1, 1, 2))
        assert scored.reward is None and scored.diagnostics.segment_entropy == {}

    def test_trajectory_rows(self):
        # rows at positions 2, 3, 5 of: T T r r V r (r: the trajectory's own rows); the first two see no vision key
        keys = KeySets(torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool), torch.tensor([0, 0, 0, 0, 1, 0],
                                                                                          dtype=torch.bool))
        trajectory = RowKeys.of(keys, [2, 3, 5], torch.zeros(1, 3))
        q = [0.2, 0.8]  # the scored row spreads its text mass 0.1 / 0.4: H~^T < 1; the others evenly: 1
        masses = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]]])
        entropies = torch.tensor([[[math.log(2), NAN], [math.log(2), NAN], [entropy_of(q), 0.0]]])
        scored = score_output(masses, [0], 2, 1, trajectory=trajectory, entropies=entropies)
        entropy = scored.diagnostics.segment_entropy['all']
        assert entropy.H_T == pytest.approx(entropy_of(q) / math.log(2), abs=1e-6)  # the first rows left out
        assert math.isnan(entropy.H_V) and math.isnan(entropy.MDI)  # |V_{i,t}| = 1


# ---------------------------------------------------------------------------------------------------------------
# the capture on synthetic probabilities

def synthetic_capture(selected=None, rows=range(5, 9)):
    """Keys 0..4 of a 10-position sequence: ``T = {0, 1, 2}``, ``V = {3, 4}``; 2 attention layers (decoder 1 and 3)."""
    text = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    vision = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    return LayerCapture(KeySets(text, vision), 5, rows, [1, 3], keep_key_attention=False, selected=selected)


class TestCaptureEntropies:
    """`LayerCapture.record` fills ``entropies`` beside ``masses`` (computed here from the probabilities), in chunks
    (``first_row``); a layer not recorded stays NaN (as ``masses``); a trajectory keeps only its selected rows, and a
    chunk of early rows that sees fewer keys (zero-padded) is exact; ``masses`` are `layer_modality_masses` of the
    same rows, unchanged."""

    def probabilities(self, rows, keys, seed):
        generator = torch.Generator().manual_seed(seed)
        weights = torch.rand(rows, keys, generator=generator) ** 3
        weights[0, 1] = 0.0  # a zero probability on a text key
        return weights / weights.sum(dim=1, keepdim=True)

    def test_chunks_and_layers(self):
        from ddapo.core.formulas import layer_modality_masses
        capture = synthetic_capture()
        p = self.probabilities(4, 9, seed=0)
        capture.record(3, p[:3], 0)
        capture.record(3, p[3:], 3)
        capture = capture.finish()
        expected = [[within(row, [0, 1, 2]), within(row, [3, 4])] for row in p.double().tolist()]
        nan_equal(capture.entropies[1], expected, 1e-6)
        assert torch.isnan(capture.entropies[0]).all() and torch.isnan(capture.masses[0]).all()
        assert torch.equal(capture.masses[1], layer_modality_masses(p[:, :5], capture.text_keys, capture.vision_keys))

    def test_selected_rows(self):
        capture = synthetic_capture(selected=[0, 2], rows=range(5, 8))
        p = self.probabilities(3, 8, seed=1)
        capture.record(1, p[:1, :4], 0)  # an early chunk: its keys stop before the prompt's end (padded with zeros)
        capture.record(1, p[1:], 1)
        capture = capture.finish()
        assert capture.entropies.shape == capture.masses.shape == (2, 2, 2)
        padded = p.clone()
        padded[0, 4:] = 0.0  # row 0 sees keys 0..3 only: one vision key
        expected = [[within(padded[r].double().tolist(), [0, 1, 2]), within(padded[r].double().tolist(), [3, 4])]
                    for r in (0, 2)]
        nan_equal(capture.entropies[0], expected, 1e-6)
        assert float(capture.entropies[0, 0, 1]) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the capture on a real model, against the eager model's output_attentions

@pytest.fixture(scope='module')
def sharp_qwen25(qwen25):
    """conftest's tiny Qwen2.5-VL (this module's copy) with every language q/k projection scaled x8: a fresh tiny model
    attends almost uniformly (every entropy near 1), sharpened, tokens and layers differ."""
    with torch.no_grad():
        for name, module in qwen25.model.named_modules():
            if name.endswith(('q_proj', 'k_proj')) and 'visual' not in name:
                module.weight.mul_(8.0)
    return qwen25


@contextlib.contextmanager
def scored_captures(monkeypatch, pass_entropy=False):
    """Every ``(row, key sets, capture)`` the reward's calls score (`RewardCall.score`: the path's outputs and the
    self-check's eager ones); `RewardCall.score` hands each capture's ``entropies`` to `score_output` itself
    (``pass_entropy`` is kept for the callers, a no-op)."""
    from ddapo import call
    seen = []
    original = call.RewardCall.score

    def score(self, output, run, k, report, count=True):
        capture = None if run.captures is None or run.out_of_memory or run.failure else run.captures[k]
        if capture is not None:
            seen.append((output.row, output.key_sets, capture))
        return original(self, output, run, k, report, count)

    monkeypatch.setattr(call.RewardCall, 'score', score)
    yield seen


def capture_entropies(capture, key_sets):
    """``H~^T``, ``H~^V`` per layer and token from the capture (Eq. 15, `modality_entropy`)."""
    return (modality_entropy(capture.masses[..., 0], capture.entropies[..., 0], key_sets.num_text_keys),
            modality_entropy(capture.masses[..., 1], capture.entropies[..., 1], key_sets.num_vision_keys))


# fp32: the path's forward and the naive eager forward differ by about 1e-6 in the probabilities (the reward's tests
# hold R^bal to 1e-5), and the entropy of the sharpened model's peaked rows amplifies that (d H = -sum dq log q, with
# log q down to about -30): up to 1.6e-5 seen. A wrong key set, renormalisation or row is off by far more.
ENTROPY_TOLERANCE = 5e-5


def assert_matches_eager(policy, seen):
    """Each captured output's ``H~^T``, ``H~^V`` equal the eager model's, layer by layer and token by token, within
    `ENTROPY_TOLERANCE`, and are undefined at the same places; the values spread (the test can fail)."""
    assert seen
    spread = []
    for row, key_sets, capture in seen:
        naive_text, naive_vision, keys = naive_reference.modality_entropies(policy, row)
        assert (keys.num_text_keys, keys.num_vision_keys) == (key_sets.num_text_keys, key_sets.num_vision_keys)
        h_text, h_vision = capture_entropies(capture, key_sets)
        nan_equal(h_text, naive_text, ENTROPY_TOLERANCE)
        nan_equal(h_vision, naive_vision, ENTROPY_TOLERANCE)
        spread += h_vision.flatten().tolist()
    assert max(spread) - min(spread) > 0.05, 'the vision entropies should differ between layers and tokens'


class TestCaptureAgainstEager:
    """Single process, tiny Qwen2.5-VL (sharpened): on each path of the reward's own forwards (shared packs a
    prompt's outputs; rows; eager), and inside the old log-prob forward (right padding), the capture's entropies are
    those of the eager model's ``output_attentions``."""

    @pytest.mark.parametrize('attention', ['shared', 'rows', 'eager'])
    def test_own_forwards(self, sharp_qwen25, attention, monkeypatch, tmp_path):
        sharp_qwen25.args.output_dir = str(tmp_path)
        columns = reward_kwargs(sharp_qwen25, COMPLETIONS[:3])
        columns['messages'][1] = list(columns['messages'][0][:1]) + [columns['messages'][1][1]]  # one prompt, 2 outputs
        columns['images'][1] = columns['images'][0]
        columns['prompt_id'][1] = columns['prompt_id'][0]
        from ddapo.reward import DDAPOAttentionORM
        with scored_captures(monkeypatch) as seen:
            DDAPOAttentionORM(config=DDAPOConfig(attention=attention, forward='own', report=False))(
                COMPLETIONS[:3], **columns)
        assert_matches_eager(sharp_qwen25, seen)

    def test_old_logps(self, sharp_qwen25, monkeypatch, tmp_path):
        from test_old_logps import capture_for, micro_batch, old_logps_logits
        sharp_qwen25.args.output_dir = str(tmp_path)
        columns = reward_kwargs(sharp_qwen25, COMPLETIONS[:3])
        columns['request_id'] = [f'r{i}' for i in range(3)]
        capture, reward = capture_for(sharp_qwen25, DDAPOConfig(forward='auto', report=False, self_check=False))
        samples, model_inputs = micro_batch(sharp_qwen25, columns)
        with capture(samples, model_inputs):
            old_logps_logits(sharp_qwen25, dict(model_inputs))
        with scored_captures(monkeypatch) as seen:
            reward(COMPLETIONS[:3], **columns)
        assert reward.swift.path.name == 'old_logps' and reward.scheduler.last_forwards == 0
        assert len(seen) == 3
        assert_matches_eager(sharp_qwen25, seen)


class TestRewardsUnchanged:
    """The entropies never reach a reward: with `layer_modality_entropies` replaced by NaN in the capture, every reward
    of the call is the same, bit for bit (were they read, the rewards would be NaN or None)."""

    @pytest.mark.parametrize('attention', ['shared', 'rows'])
    def test_bit_for_bit(self, sharp_qwen25, attention, monkeypatch, tmp_path):
        from ddapo.engine import capture
        from ddapo.reward import DDAPOAttentionORM
        sharp_qwen25.args.output_dir = str(tmp_path)
        columns = reward_kwargs(sharp_qwen25, COMPLETIONS[:3])
        config = DDAPOConfig(attention=attention, forward='own', report=False)
        rewards = DDAPOAttentionORM(config=config)(COMPLETIONS[:3], **columns)
        monkeypatch.setattr(capture, 'layer_modality_entropies',
                            lambda head_mean, *_: torch.full((head_mean.shape[0], 2), NAN, dtype=head_mean.dtype))
        without = DDAPOAttentionORM(config=config)(COMPLETIONS[:3], **columns)
        assert rewards == without and all(r is not None and 0 < r < 1 for r in rewards)


def naive_output_metrics(h_text, h_vision, layers):
    """Eq. (16)-(17) written here from the eager per-layer, per-token entropies: per token the mean over ``layers`` of
    the defined values, per output the mean over the tokens with one; ``MDI = H_T / (H_T + H_V)`` of those."""
    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else NAN

    out = {name: mean([mean([float(per_layer[l, t]) for l in layers]) for t in range(per_layer.shape[1])])
           for name, per_layer in (('H_T', h_text), ('H_V', h_vision))}
    total = out['H_T'] + out['H_V']
    out['MDI'] = out['H_T'] / total if total > 0 else NAN
    return out


class TestStepMetrics:
    """With `score_output` given the capture's entropies (as ``RewardCall.score`` passes them), the step's
    ``ddapo/{all,early,middle,late}/{MDI,H_T,H_V}/mean`` are Eq. (16)-(17) over the eager model's entropies, the
    thirds of ``L_att`` counted here from the notation; the rewards are those of a call without them."""

    def test_against_eager(self, sharp_qwen25, monkeypatch, tmp_path):
        from ddapo.reward import DDAPOAttentionORM
        sharp_qwen25.args.output_dir = str(tmp_path)
        columns = reward_kwargs(sharp_qwen25, COMPLETIONS)
        config = DDAPOConfig(attention='rows', forward='own', report=False, self_check=False)
        plain = DDAPOAttentionORM(config=config)(COMPLETIONS, **columns)
        reward = DDAPOAttentionORM(config=config)
        with scored_captures(monkeypatch, pass_entropy=True):
            rewards = reward(COMPLETIONS, **columns)
        assert rewards == plain
        metrics = reward.last_metrics
        naive = [naive_reference.modality_entropies(sharp_qwen25, row)[:2] for row in rows_of(columns)]
        n = naive[0][0].shape[0]
        assert n >= 3
        thirds = {'all': range(n), 'early': range(n // 3), 'middle': range(n // 3, 2 * n // 3),
                  'late': range(2 * n // 3, n)}
        for name, layers in thirds.items():
            per_output = [naive_output_metrics(h_text, h_vision, layers) for h_text, h_vision in naive]
            for quantity in ('MDI', 'H_T', 'H_V'):
                expected = sum(o[quantity] for o in per_output) / len(per_output)
                assert metrics[f'ddapo/{name}/{quantity}/mean'] == pytest.approx(expected, abs=ENTROPY_TOLERANCE), (
                    name, quantity)
        assert len({round(metrics[f'ddapo/{name}/MDI/mean'], 4) for name in thirds}) > 1


class TestTrajectory:
    """A multi-turn trajectory (notation section 6: the capture keeps its selected rows, each row sees the keys before
    it) through the reward: each row's vision entropy per layer equals the eager model's over the vision keys before
    that row, normalised by their count (NaN for a row that sees fewer than 2, or no attention on them); the rewards are those of a call
    without the entropies in `score_output`, and the step's metrics hold values in ``[0, 1]``."""

    def test_rows_against_eager(self, sharp_qwen25, monkeypatch, tmp_path):
        from test_multi_turn import FINAL, NO_REQUEST, ZOOM_UPPER_RIGHT, columns_of, trajectory
        from ddapo.reward import DDAPOAttentionORM
        sharp_qwen25.args.output_dir = str(tmp_path)
        rows = [trajectory(sharp_qwen25, [ZOOM_UPPER_RIGHT, NO_REQUEST, FINAL], request_id='a'),
                trajectory(sharp_qwen25, [NO_REQUEST, FINAL], request_id='b')]
        config = DDAPOConfig(attention='rows', forward='own', report=False, self_check=False)
        plain = DDAPOAttentionORM(config=config)([''] * 2, **columns_of(rows, sharp_qwen25))
        reward = DDAPOAttentionORM(config=config)
        with scored_captures(monkeypatch, pass_entropy=True) as seen:
            rewards = reward([''] * 2, **columns_of(rows, sharp_qwen25))
        assert rewards == plain and all(r is not None for r in rewards) and len(seen) == 2
        for row, _, capture in seen:
            _, details = naive_reference.trajectory_reward(sharp_qwen25, row, details=True)
            batch, _, _ = naive_reference.encode_trajectory(sharp_qwen25, row)
            maps = naive_reference.full_attention_maps(sharp_qwen25, naive_reference.eager_attentions(sharp_qwen25,
                                                                                                      batch))
            heads = torch.stack(maps)[:, 0].double().mean(dim=1)  # [layers, S, S]
            expected = torch.full((heads.shape[0], len(details['rows'])), NAN, dtype=torch.float64)
            for k, s in enumerate(details['rows']):
                keys = [p for p in details['vision'] if p < s]
                for layer in range(heads.shape[0]):
                    mass = float(heads[layer, s, keys].sum()) if keys else 0.0
                    if len(keys) >= 2 and mass >= len(keys) * 2.0 ** -126:  # notation section 7's table
                        expected[layer, k] = within(heads[layer, s].tolist(), keys) / math.log(len(keys))
            counts = torch.tensor([sum(p < s for p in details['vision']) for s in details['rows']])
            actual = modality_entropy(capture.masses[..., 1], capture.entropies[..., 1], counts)
            nan_equal(actual, expected, ENTROPY_TOLERANCE)
            assert (~torch.isnan(expected)).sum() > 0
        metrics = reward.last_metrics
        assert all(0 <= metrics[f'ddapo/{s}/{q}/mean'] <= 1 for s in ('all', 'early', 'middle', 'late')
                   for q in ('MDI', 'H_T', 'H_V'))


class TestEntropyFailureIsADiagnostic:
    """A failure in the entropies (metrics only) never costs the output its reward: the reward is the one without
    them, the failure is handed to the caller (``diagnostic_failure``) to count. Edge case: the entropy segments
    are empty."""

    def test_failure(self, monkeypatch):
        from ddapo.core import scorer
        masses = torch.tensor([[[0.6, 0.2], [0.3, 0.5]]])
        plain = scorer.score_output(masses, [0], 10, 30)

        def broken(*args, **kwargs):
            raise RuntimeError('entropy bug')

        monkeypatch.setattr(scorer, 'segment_attention_entropy', broken)
        scored = scorer.score_output(masses, [0], 10, 30, entropies=torch.zeros(1, 2, 2))
        assert scored.reward == plain.reward and isinstance(scored.diagnostic_failure, RuntimeError)
        assert scored.diagnostics.segment_entropy == {}
