"""DDAPOConfig: the reward's validated DDAPO_* settings."""
import pytest

from ddapo.core.config import DDAPOConfig


class TestDDAPOConfig:
    """Edge cases: defaults, boolean spellings, a bad value names the variable and the allowed values, an
    unknown DDAPO_* variable (a typo) fails instead of being ignored, non-DDAPO variables are ignored."""

    def test_defaults(self):
        assert DDAPOConfig.from_env({}) == DDAPOConfig(debug=True, report=True, report_samples=2, strict=False,
                                                       reward='balance', sigma=1.0, gate_reward='', layers='last:8',
                                                       token_weights=False, token_weight_clip=(0.2, 3.0),
                                                       token_weight_sigma=0.0)

    def test_report_settings(self):
        config = DDAPOConfig.from_env({'DDAPO_REPORT': '1', 'DDAPO_REPORT_SAMPLES': '5'})
        assert config.report is True and config.report_samples == 5
        assert DDAPOConfig.from_env({'DDAPO_REPORT': '0'}).report is False
        with pytest.raises(ValueError, match='DDAPO_REPORT_SAMPLES is set but has no effect without DDAPO_REPORT=1'):
            DDAPOConfig.from_env({'DDAPO_REPORT': '0', 'DDAPO_REPORT_SAMPLES': '5'})

    @pytest.mark.parametrize('raw', ['-1', 'two', '1.5', ''])
    def test_bad_count(self, raw):
        with pytest.raises(ValueError, match=r'DDAPO_REPORT_SAMPLES=.*allowed values: an integer >= 0'):
            DDAPOConfig.from_env({'DDAPO_REPORT_SAMPLES': raw})

    @pytest.mark.parametrize('raw, value', [('0', False), ('false', False), ('Off', False), ('1', True), ('yes', True)])
    def test_bool_spellings(self, raw, value):
        assert DDAPOConfig.from_env({'DDAPO_DEBUG': raw}).debug is value

    def test_bad_value(self):
        with pytest.raises(ValueError, match=r"DDAPO_DEBUG='maybe'.*allowed values: 1, true"):
            DDAPOConfig.from_env({'DDAPO_DEBUG': 'maybe'})

    def test_unknown_variable(self):
        with pytest.raises(ValueError, match='Unknown DDAPO setting.*DDAPO_DEGUB.*known: .*DDAPO_DEBUG'):
            DDAPOConfig.from_env({'DDAPO_DEGUB': '1'})

    def test_other_variables_ignored(self):
        assert DDAPOConfig.from_env({'PATH': '/bin', 'DDAPOX': '1'}).debug is True

    def test_describe(self):
        assert DDAPOConfig(debug=False).describe() == (
            'DDAPO_DEBUG=False, DDAPO_REPORT=True, DDAPO_REPORT_SAMPLES=2, DDAPO_STRICT=False, DDAPO_REWARD=balance, '
            'DDAPO_SIGMA=1.0, DDAPO_GATE_REWARD=, DDAPO_LAYERS=last:8, DDAPO_FORWARD=auto, DDAPO_ATTENTION=shared, '
            'DDAPO_PACK_TOKENS=8192, '
            'DDAPO_TOKEN_WEIGHTS=False, DDAPO_TOKEN_WEIGHT_CLIP=0.2,3.0, DDAPO_TOKEN_WEIGHT_SIGMA=0.0, '
            'DDAPO_VALIDATE_STEPS=0, DDAPO_EARLY_REWARD_WEIGHTS=, DDAPO_EARLY_STEPS=0.1, DDAPO_SELF_CHECK=True')

    def test_paths(self):
        config = DDAPOConfig.from_env({'DDAPO_ATTENTION': 'Shared', 'DDAPO_PACK_TOKENS': '4096'})
        assert (config.forward, config.attention, config.pack_tokens) == ('auto', 'shared', 4096)
        assert DDAPOConfig.from_env({'DDAPO_ATTENTION': 'Eager'}).attention == 'eager'
        assert DDAPOConfig.from_env({'DDAPO_FORWARD': 'Old_Logps'}).forward == 'old_logps'
        # the reward's own forwards read DDAPO_ATTENTION: under old_logps only on validation steps
        config = DDAPOConfig.from_env({'DDAPO_FORWARD': 'old_logps', 'DDAPO_ATTENTION': 'eager',
                                       'DDAPO_VALIDATE_STEPS': '2'})
        assert (config.forward, config.attention) == ('old_logps', 'eager')

    def test_variants(self):
        config = DDAPOConfig.from_env({'DDAPO_REWARD': 'Gated', 'DDAPO_GATE_REWARD': 'answer_match',
                                       'DDAPO_SIGMA': '0.5', 'DDAPO_LAYERS': 'late'})
        assert (config.reward, config.gate_reward, config.sigma, config.layers) == ('gated', 'answer_match', 0.5, 'late')

    @pytest.mark.parametrize('environ, message', [
        ({'DDAPO_REWARD': 'ratio'}, r"DDAPO_REWARD='ratio'.*allowed values: balance, group, gated"),
        ({'DDAPO_SIGMA': '0'}, r"DDAPO_SIGMA='0'.*finite number > 0"),
        ({'DDAPO_SIGMA': 'inf'}, r"DDAPO_SIGMA='inf'"),
        ({'DDAPO_LAYERS': 'last:0'}, r"DDAPO_LAYERS='last:0'.*last:K \(K >= 1\), all, early, middle, late"),
        ({'DDAPO_LAYERS': 'first:3'}, r"DDAPO_LAYERS='first:3'"),
        ({'DDAPO_REWARD': 'gated'}, r'DDAPO_REWARD=gated needs DDAPO_GATE_REWARD'),
        ({'DDAPO_ATTENTION': 'flash'}, r"DDAPO_ATTENTION='flash'.*allowed values: shared, rows, eager"),
        ({'DDAPO_FORWARD': 'trainer'}, r"DDAPO_FORWARD='trainer'.*allowed values: auto, old_logps, own"),
        ({'DDAPO_PACK_TOKENS': '0'}, r"DDAPO_PACK_TOKENS='0'.*integer >= 1"),
        ({'DDAPO_TOKEN_WEIGHTS': '1', 'DDAPO_TOKEN_WEIGHT_CLIP': '1.5,3'}, r"'1.5,3'.*0 <= LOW <= 1 <= HIGH"),
        ({'DDAPO_TOKEN_WEIGHTS': '1', 'DDAPO_TOKEN_WEIGHT_CLIP': '0.2,0.9'}, r"'0.2,0.9'.*0 <= LOW <= 1 <= HIGH"),
        ({'DDAPO_TOKEN_WEIGHTS': '1', 'DDAPO_TOKEN_WEIGHT_CLIP': '0.2'}, r"DDAPO_TOKEN_WEIGHT_CLIP='0.2'"),
        ({'DDAPO_TOKEN_WEIGHTS': '1', 'DDAPO_TOKEN_WEIGHT_CLIP': '0.2,inf'}, r"DDAPO_TOKEN_WEIGHT_CLIP='0.2,inf'"),
        ({'DDAPO_TOKEN_WEIGHTS': '1', 'DDAPO_TOKEN_WEIGHT_SIGMA': '-1'}, r"DDAPO_TOKEN_WEIGHT_SIGMA='-1'.*>= 0"),
    ])
    def test_bad_variant_settings(self, environ, message):
        with pytest.raises(ValueError, match=message):
            DDAPOConfig.from_env(environ)


class TestTokenWeightSettings:
    """Edge cases: the range is parsed (spaces allowed, (1, 1) allowed), sigma 0 allowed; a setting that would have
    no effect (token-weight settings without DDAPO_TOKEN_WEIGHTS=1, DDAPO_SIGMA without a group reward,
    DDAPO_GATE_REWARD without gated) fails instead of being ignored."""

    def test_parsed(self):
        config = DDAPOConfig.from_env({'DDAPO_TOKEN_WEIGHTS': '1', 'DDAPO_TOKEN_WEIGHT_CLIP': '0.5, 2',
                                       'DDAPO_TOKEN_WEIGHT_SIGMA': '1.5'})
        assert (config.token_weights, config.token_weight_clip, config.token_weight_sigma) == (True, (0.5, 2.0), 1.5)
        config = DDAPOConfig.from_env({'DDAPO_TOKEN_WEIGHTS': 'on', 'DDAPO_TOKEN_WEIGHT_CLIP': '1,1',
                                       'DDAPO_TOKEN_WEIGHT_SIGMA': '0'})
        assert config.token_weight_clip == (1.0, 1.0) and config.token_weight_sigma == 0.0

    @pytest.mark.parametrize('environ, message', [
        ({'DDAPO_TOKEN_WEIGHT_CLIP': '0.5,2'}, 'DDAPO_TOKEN_WEIGHT_CLIP is set but has no effect without '
                                               'DDAPO_TOKEN_WEIGHTS=1'),
        ({'DDAPO_TOKEN_WEIGHTS': '0', 'DDAPO_TOKEN_WEIGHT_SIGMA': '1'}, 'DDAPO_TOKEN_WEIGHT_SIGMA is set'),
        ({'DDAPO_SIGMA': '0.5'}, 'DDAPO_SIGMA is set but has no effect without DDAPO_REWARD=group or gated'),
        ({'DDAPO_REWARD': 'group', 'DDAPO_GATE_REWARD': 'answer_match'}, 'DDAPO_GATE_REWARD is set but has no effect'),
        ({'DDAPO_FORWARD': 'old_logps', 'DDAPO_ATTENTION': 'rows'},
         'DDAPO_ATTENTION is set but has no effect without DDAPO_FORWARD=auto or own, or DDAPO_VALIDATE_STEPS'),
        ({'DDAPO_ATTENTION': 'rows', 'DDAPO_PACK_TOKENS': '4096'},
         'DDAPO_PACK_TOKENS is set but has no effect without DDAPO_ATTENTION=shared'),
        ({'DDAPO_FORWARD': 'old_logps', 'DDAPO_PACK_TOKENS': '4096'}, 'DDAPO_PACK_TOKENS is set but has no effect'),
    ])
    def test_setting_without_effect(self, environ, message):
        with pytest.raises(ValueError, match=message):
            DDAPOConfig.from_env(environ)
