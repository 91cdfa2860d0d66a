"""The ms-swift side (ddapo.ms_swift): every private name it lists resolves in the installed packages (whatever their
versions: the reward warns at start when they differ from CHECKED_AGAINST), the layers below it import no ms-swift,
transformers or accelerate (import analysis), rows come back as ms-swift batched them, and which runs need lockstep."""
import ast
import glob
import importlib
import inspect
import os
import re
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from conftest import PLUGIN_DIR
from ddapo.ms_swift import compat
from ddapo.ms_swift.compat import INTERNALS, version_drift
from ddapo.ms_swift.forward_env import _forwards_are_collective
from ddapo.ms_swift.encoding import reward_rows


def resolve(module: str, path: str):
    """The object at ``module.path``; for an instance attribute (set in ``__init__`` or later), the class whose
    source assigns ``self.<attribute>``."""
    owner = importlib.import_module(module)
    parts = path.split('.')
    for i, part in enumerate(parts):
        if hasattr(owner, part):
            owner = getattr(owner, part)
        elif i == len(parts) - 1 and inspect.isclass(owner):
            source = ''.join(inspect.getsource(c) for c in owner.__mro__ if c.__module__.split('.')[0] in
                             ('swift', 'transformers'))
            assert re.search(rf'self\.{part}\s*(:[^=\n]+)?=[^=]', source), \
                f'{module}.{path}: no class in its MRO sets self.{part}'
            return owner
        else:
            raise AssertionError(f'{module}.{path}: {part!r} not found')
    return owner


class TestInternals:
    """Edge cases: functions, class attributes, properties, instance attributes; a name that does not exist fails."""

    @pytest.mark.parametrize('module, path, why', INTERNALS, ids=[f'{m}.{p}' for m, p, _ in INTERNALS])
    def test_resolves(self, module, path, why):
        resolve(module, path)  # raises AssertionError when the name is gone

    def test_missing_name_fails(self):
        with pytest.raises(AssertionError, match='not found'):
            resolve('swift.template', 'Template._no_such_method.x')
        with pytest.raises(AssertionError, match='sets self._no_such'):
            resolve('swift.template', 'Template._no_such')

    def test_version_drift(self, monkeypatch):
        from importlib.metadata import version
        installed = {'ms-swift': version('ms-swift'), 'transformers': version('transformers')}
        monkeypatch.setattr(compat, 'CHECKED_AGAINST', installed)
        assert version_drift() == {}
        monkeypatch.setattr(compat, 'CHECKED_AGAINST', {**installed, 'transformers': '0.0.1', 'no-such-pkg': '1'})
        assert version_drift() == {'transformers': ('0.0.1', installed['transformers']),
                                   'no-such-pkg': ('1', 'not installed')}


def imports(path):
    """``(module, name)`` of every import in a source file (``name`` None for ``import module``); relative imports are
    resolved against the ``ddapo`` package."""
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.module or '', a.name) for a in node.names]
    return found


def package_modules(folder):
    base = os.path.join(PLUGIN_DIR, 'ddapo')
    return sorted(glob.glob(os.path.join(base, folder, '*.py')))


THIRD_PARTY = ('swift', 'transformers', 'accelerate', 'peft', 'deepspeed', 'trl')


class TestLayers:
    """By import analysis of the package's source: the core imports nothing above it and no ms-swift, transformers or
    accelerate; the engine imports the core and torch only; outside ``ms_swift/`` only the ORM module imports
    ms-swift, and only its public plugin API; nothing outside ``ms_swift/`` imports a private name. Edge case: a
    module added to a layer folder is checked too."""

    def offenders(self, paths, allowed_swift=()):
        found = []
        for path in paths:
            for module, name in imports(path):
                top = module.split('.')[0]
                if top in THIRD_PARTY and (module, name) not in allowed_swift:
                    found.append(f'{os.path.relpath(path, PLUGIN_DIR)}: {module}.{name}')
                if name is not None and name.startswith('_') and top in THIRD_PARTY + ('ddapo',):
                    found.append(f'{os.path.relpath(path, PLUGIN_DIR)}: private {module}.{name}')
        return found

    def test_core(self):
        paths = package_modules('core')
        assert len(paths) >= 7 and self.offenders(paths) == []
        above = [f'{p}: {m}' for p in paths for m, _ in imports(p) if m.startswith(
            ('ddapo.engine', 'ddapo.ms_swift', 'ddapo.reward', 'ddapo.step_log', 'ddapo.call', 'ddapo.self_check_stage'))]
        assert above == []

    def test_engine(self):
        paths = package_modules('engine')
        assert len(paths) >= 2 and self.offenders(paths) == []
        above = [f'{p}: {m}' for p in paths for m, _ in imports(p) if m.startswith(
            ('ddapo.ms_swift', 'ddapo.reward', 'ddapo.step_log', 'ddapo.call', 'ddapo.self_check_stage'))]
        assert above == []

    def test_outside_the_ms_swift_side(self):
        paths = package_modules('.') + [os.path.join(PLUGIN_DIR, 'plugin.py')]
        public = (('swift.rewards', 'ORM'), ('swift.utils', 'get_logger'), ('swift.rewards', 'orms'))
        assert self.offenders(paths, allowed_swift=public) == []

    def test_the_check_fails_on_an_offender(self, tmp_path):
        bad = tmp_path / 'bad.py'
        bad.write_text('from transformers.integrations.sdpa_attention import sdpa_attention_forward\n'
                       'from ddapo.engine.capture import _ACTIVE\n')
        found = self.offenders([str(bad)])
        assert len(found) == 2 and 'private ddapo.engine.capture._ACTIVE' in found[1], found


class TestRewardRows:
    """Edge cases: the kwargs that are not rows are left out, a kwarg that is not a column fails naming it."""

    def test_rows(self):
        rows = reward_rows({'trainer': object(), 'trainer_state': None, 'trajectory_inputs': {},
                            'messages': [['a'], ['b']], 'solution': ['x', None]}, 2)
        assert [dict(row.columns) for row in rows] == [{'messages': ['a'], 'solution': 'x'}, {'messages': ['b'], 'solution': None}]
        assert [row.solution for row in rows] == ['x', None]

    def test_not_a_column(self):
        with pytest.raises(RuntimeError, match=r"\['extra'\] are not columns of 2 values"):
            reward_rows({'messages': [1, 2], 'extra': [1]}, 2)


def accelerator(processes, kind, zero_stage=None):
    plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    return SimpleNamespace(num_processes=processes, distributed_type=kind,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


class TestForwardsAreCollective:
    """Edge cases: one process never; ZeRO-3 and FSDP yes, ZeRO-2 and DDP no; sequence parallelism yes; a distributed
    type it does not know counts as collective."""

    @pytest.mark.parametrize('processes, kind, stage, parallel, expected', [
        (1, DistributedType.DEEPSPEED, 3, 1, False),
        (2, DistributedType.DEEPSPEED, 3, 1, True),
        (2, DistributedType.DEEPSPEED, 2, 1, False),
        (2, DistributedType.FSDP, None, 1, True),
        (2, DistributedType.MULTI_GPU, None, 1, False),
        (2, DistributedType.MULTI_CPU, None, 2, True),
        (2, DistributedType.XLA, None, 1, True),
    ])
    def test_cases(self, processes, kind, stage, parallel, expected):
        template = SimpleNamespace(sequence_parallel_size=parallel)
        assert _forwards_are_collective(accelerator(processes, kind, stage), template) is expected
