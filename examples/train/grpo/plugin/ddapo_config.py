"""The reward's settings: one validated object read from ``DDAPO_*`` environment variables.

ms-swift hands a reward function only the trainer's own arguments, so the reward's settings come
from the environment. Every ``DDAPO_*`` variable must be known and well-formed: a typo or a bad
value fails at start, naming the variable and what it accepts, instead of silently running defaults.
"""
import os
from dataclasses import dataclass, fields
from typing import Dict, Mapping, Optional

_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f'{name}={raw!r} is not a boolean; allowed values: {", ".join(_TRUE + _FALSE)}')


def _parse_count(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f'{name}={raw!r} is not a count; allowed values: an integer >= 0')
    return value


_PARSERS = {bool: _parse_bool, int: _parse_count}


@dataclass(frozen=True)
class DDAPOConfig:
    """Settings of the ``ddapo_attention`` reward; field ``x`` is read from ``DDAPO_X``."""
    debug: bool = True  # DDAPO_DEBUG: the one-time [DDAPO_DEBUG] report of the first reward forward
    report: bool = True  # DDAPO_REPORT: <output_dir>/ddapo/report.md and its pictures on logging steps
    report_samples: int = 2  # DDAPO_REPORT_SAMPLES: outputs per logging step shown in the report
    strict: bool = False  # DDAPO_STRICT: raise instead of returning None for a reward that cannot be computed

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
        types = {f.name: f.type for f in fields(cls)}
        values = {}
        for name, field_name in known.items():
            if name in environ:
                values[field_name] = _PARSERS[types[field_name]](name, environ[name])
        return cls(**values)

    def describe(self) -> str:
        return ', '.join(f'{name}={getattr(self, field)}' for name, field in self.variables().items())
