"""The reward's settings: one validated object, built directly or read from ``DDAPO_*`` environment variables.

ms-swift hands a reward function only the trainer's own arguments, so under ``swift rlhf`` the reward's
settings come from the environment (`DDAPOConfig.from_env`). Every ``DDAPO_*`` variable must be known and
well-formed: a typo or a bad value fails at start, naming the variable and what it accepts, instead of silently
running defaults. Built directly (``DDAPOConfig(reward='group')``, then ``DDAPOAttentionORM(args, config=...)``),
the same checks run on the values.
"""
import math
import os
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Callable, Dict, Mapping, Optional, Tuple

from ddapo.core.formulas import layer_set

_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')
REWARDS = ('balance', 'group', 'gated')
ATTENTION_PATHS = ('shared', 'rows', 'eager')
FORWARDS = ('auto', 'old_logps', 'own')


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f'{name}={raw!r} is not a boolean; allowed values: {", ".join(_TRUE + _FALSE)}')


def _number(kind: Callable[[str], float], lowest: float, strict: bool, what: str, allowed: str):
    """A parser of finite numbers ``>= lowest`` (``> lowest`` when ``strict``)."""

    def parse(name: str, raw: str):
        try:
            value = kind(raw.strip())
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < lowest or (strict and value == lowest):
            raise ValueError(f'{name}={raw!r} is not {what}; allowed values: {allowed}')
        return value

    return parse


def _choice(options: Tuple[str, ...], what: str):
    """A parser of one of ``options``, case-insensitive."""

    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(f'{name}={raw!r} is not {what}; allowed values: {", ".join(options)}')
        return value

    return parse


_parse_count = _number(int, 0, False, 'a count', 'an integer >= 0')
_parse_tokens = _number(int, 1, False, 'a token budget', 'an integer >= 1')
_parse_positive = _number(float, 0.0, True, 'a positive number', 'a finite number > 0')
_parse_nonnegative = _number(float, 0.0, False, 'a number >= 0', 'a finite number >= 0')
_parse_reward = _choice(REWARDS, 'a reward variant')
_parse_attention = _choice(ATTENTION_PATHS, 'a reward path')
_parse_forward = _choice(FORWARDS, 'a source of the attention')


def _parse_clip(name: str, raw: str) -> Tuple[float, float]:
    try:
        low, high = (float(part) for part in raw.split(','))
    except ValueError:
        low, high = -1.0, -1.0
    if not (0 <= low <= 1 <= high < float('inf')):
        raise ValueError(f'{name}={raw!r} is not a weight range; allowed values: LOW,HIGH with 0 <= LOW <= 1 <= HIGH '
                         '(the weights have mean 1, so the range must hold 1), for example 0.2,3.0')
    return low, high


def _parse_layers(name: str, raw: str) -> str:
    value = raw.strip()
    try:
        layer_set(64, value)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a layer set; allowed values: last:K (K >= 1), all, early, middle, "
                         'late') from None
    return value


def _parse_name(name: str, raw: str) -> str:
    return raw.strip()


def _parse_weights(name: str, raw: str) -> Tuple[float, ...]:
    """One finite weight per ``--reward_funcs`` entry, separated by spaces or commas (as ``--reward_weights``); an
    empty value is no warm-up (how a launcher preset's warm-up is turned off)."""
    if not raw.strip():
        return ()
    try:
        values = tuple(float(part) for part in raw.replace(',', ' ').split())
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f'{name}={raw!r} is not a list of weights; allowed values: one finite number per '
                         '--reward_funcs entry, in order, separated by spaces (as --reward_weights), e.g. "1 0 2 1"')
    return values


def _parse_early_steps(name: str, raw: str) -> float:
    """A fraction of max steps in (0, 1), or a whole number of steps >= 1."""
    try:
        value = float(raw.strip())
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and (0 < value < 1 or (value >= 1 and value == int(value)))):
        raise ValueError(f'{name}={raw!r} is not a warm-up length; allowed values: a fraction of max steps in (0, 1) '
                         '(0.1 is the reference system\'s 10%), or a whole number of steps >= 1')
    return value


def _spell(value) -> str:
    """A setting's value as the environment writes it (a tuple as ``LOW,HIGH``)."""
    return ','.join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def _spell_field(name: str, value) -> str:
    """`_spell`, but a weight list as ``--reward_weights`` writes it (an empty one as nothing)."""
    if name == 'early_reward_weights':
        return ' '.join(str(v) for v in value)
    return _spell(value)


def _setting(default, parse: Callable[[str, str], object], doc: str):
    return field(default=default, metadata={'parse': parse, 'doc': doc})


_ONLY_WITH: Dict[str, Tuple[str, Callable[['DDAPOConfig'], bool]]] = {
    'sigma': ('DDAPO_REWARD=group or gated', lambda c: c.reward in ('group', 'gated')),
    'gate_reward': ('DDAPO_REWARD=gated', lambda c: c.reward == 'gated'),
    'token_weight_clip': ('DDAPO_TOKEN_WEIGHTS=1', lambda c: c.token_weights),
    'token_weight_sigma': ('DDAPO_TOKEN_WEIGHTS=1', lambda c: c.token_weights),
    # the reward's own forwards: every call under own, fallbacks under auto, validation steps under old_logps
    'attention': ('DDAPO_FORWARD=auto or own, or DDAPO_VALIDATE_STEPS',
                  lambda c: c.forward != 'old_logps' or c.validate_steps > 0),
    'pack_tokens': ('DDAPO_ATTENTION=shared and forwards of the reward\'s own (DDAPO_FORWARD=auto or own, or '
                    'DDAPO_VALIDATE_STEPS)',
                    lambda c: c.attention == 'shared' and (c.forward != 'old_logps' or c.validate_steps > 0)),
    'report_samples': ('DDAPO_REPORT=1', lambda c: c.report),
    'early_steps': ('DDAPO_EARLY_REWARD_WEIGHTS', lambda c: bool(c.early_reward_weights)),
}


@dataclass(frozen=True)
class DDAPOConfig:
    """Settings of the ``ddapo_attention`` reward; field ``x`` is read from ``DDAPO_X``."""
    debug: bool = _setting(True, _parse_bool, 'the one-time [DDAPO_DEBUG] report of the first reward forward')
    report: bool = _setting(True, _parse_bool, '<output_dir>/ddapo/report.md and its pictures on logging steps')
    report_samples: int = _setting(2, _parse_count, 'outputs per logging step shown in the report')
    strict: bool = _setting(False, _parse_bool, 'raise instead of returning None for a reward that cannot be computed')
    reward: str = _setting('balance', _parse_reward, 'balance (Eq. 7), group (Eq. 8) or gated (Eq. 9)')
    sigma: float = _setting(1.0, _parse_positive, 'sigma of Eq. (8)')
    gate_reward: str = _setting('', _parse_name, 'the orms reward whose verdict gates Eq. (9) (>= 1 is correct)')
    layers: str = _setting('last:8', _parse_layers, 'the layers Lambda the reward reads')
    forward: str = _setting('auto', _parse_forward,
                            'where the attention is read: old_logps (inside the old log-prob forward GRPO already '
                            'runs, no forward of its own), own (a forward of its own, DDAPO_ATTENTION) or auto '
                            '(old_logps wherever it is exact, own otherwise)')
    attention: str = _setting('shared', _parse_attention,
                              'reward path: shared (one forward per prompt), rows (one sdpa forward per output, '
                              'eager rows) or eager (one eager forward per output, the reference)')
    pack_tokens: int = _setting(8192, _parse_tokens, 'most tokens in one shared-prompt forward')
    token_weights: bool = _setting(False, _parse_bool,
                                   'multiply the per-token advantages by the Eq. (11) token weights')
    token_weight_clip: Tuple[float, float] = _setting((0.2, 3.0), _parse_clip, 'LOW,HIGH bounds of the token weights')
    token_weight_sigma: float = _setting(0.0, _parse_nonnegative,
                                         'std (in tokens) of the Gaussian smoothing of the token weights; 0: none')
    validate_steps: int = _setting(0, _parse_count,
                                   'every N-th global step, Eq. (12)-(14): one more forward per forward unit (a '
                                   'prompt\'s pack under shared, an output otherwise) on the masked prompt, the '
                                   'ddapo/validity/* metrics and report; 0: never')
    early_reward_weights: Tuple[float, ...] = _setting((), _parse_weights,
                                                       'reward weights, one per --reward_funcs entry, in force for the '
                                                       'first DDAPO_EARLY_STEPS steps (the warm-up), then '
                                                       '--reward_weights')
    early_steps: float = _setting(0.1, _parse_early_steps,
                                  'the warm-up\'s length: a fraction of max steps in (0, 1), or a step count')
    self_check: bool = _setting(True, _parse_bool,
                                'on the first call that reads each path, score a few outputs per rank again with the '
                                'eager reference and move every rank to a path that agrees if they differ')

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == 'early_reward_weights' and value == ():
                continue  # the default: no warm-up (the environment never spells it)
            # the environment's parser on the value's spelling: the same checks and messages, built directly too
            if f.metadata['parse'](f.name, _spell_field(f.name, value)) != value:
                raise ValueError(f'{f.name}={value!r} is not a {type(f.default).__name__} setting; '
                                 f'{f.metadata["doc"]}')
        for field_name, (needs, holds) in _ONLY_WITH.items():
            default = next(f.default for f in fields(self) if f.name == field_name)
            if getattr(self, field_name) != default and not holds(self):
                raise ValueError(f'{field_name}={getattr(self, field_name)!r} has no effect without {needs}')
        if self.reward == 'gated' and not self.gate_reward:
            raise ValueError('DDAPO_REWARD=gated needs DDAPO_GATE_REWARD, the name of a registered reward (for '
                             'example answer_match or accuracy) whose value >= 1 marks a correct output')

    @classmethod
    def variables(cls) -> Dict[str, str]:
        """``{environment variable: field name}``."""
        return {f'DDAPO_{f.name.upper()}': f.name for f in fields(cls)}

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> 'DDAPOConfig':
        """Read and validate every ``DDAPO_*`` variable of ``environ`` (default ``os.environ``)."""
        environ = os.environ if environ is None else environ
        known = cls.variables()
        unknown = sorted(k for k in environ if k.startswith('DDAPO_') and k not in known)
        if unknown:
            raise ValueError(f'Unknown DDAPO setting(s) {", ".join(unknown)}; known: {", ".join(sorted(known))}')
        parsers = {f.name: f.metadata['parse'] for f in fields(cls)}
        values = {field_name: parsers[field_name](name, environ[name])
                  for name, field_name in known.items() if name in environ}
        settings = SimpleNamespace(**{**{f.name: f.default for f in fields(cls)}, **values})
        for field_name, (needs, holds) in _ONLY_WITH.items():
            if field_name in values and not holds(settings):
                # a setting the run would never read is a silent misconfiguration (even when set to its default)
                raise ValueError(f'DDAPO_{field_name.upper()} is set but has no effect without {needs}')
        return cls(**values)

    def describe(self) -> str:
        """The settings as they would be written in the environment."""
        return ', '.join(f'{name}={_spell_field(field_name, getattr(self, field_name))}'
                         for name, field_name in self.variables().items())
