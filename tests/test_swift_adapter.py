"""The ms-swift adapter (ddapo_swift): every private name it lists resolves in the installed packages (whatever their
versions: the reward warns at start when they differ from CHECKED_AGAINST), the reward modules outside it import no
ms-swift, rows come back as ms-swift batched them, and which runs need lockstep."""
import ast
import importlib
import inspect
import os
import re
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

import ddapo_swift
from conftest import PLUGIN_DIR
from ddapo_swift import INTERNALS, _forwards_are_collective, reward_rows, version_drift


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
        monkeypatch.setattr(ddapo_swift, 'CHECKED_AGAINST', installed)
        assert version_drift() == {}
        monkeypatch.setattr(ddapo_swift, 'CHECKED_AGAINST', {**installed, 'transformers': '0.0.1', 'no-such-pkg': '1'})
        assert version_drift() == {'transformers': ('0.0.1', installed['transformers']),
                                   'no-such-pkg': ('1', 'not installed')}


class TestOnlyTheAdapterImportsSwift:
    """The reward's modules other than ddapo_swift, the registry (plugin.py) and the ORM module import no ms-swift."""

    ALLOWED = {'ddapo_swift.py', 'plugin.py', 'ddapo_attention_reward.py', 'answer_match_reward.py'}

    def test_imports(self):
        offenders = []
        for name in sorted(os.listdir(PLUGIN_DIR)):
            if not name.endswith('.py') or name in self.ALLOWED:
                continue
            tree = ast.parse(open(os.path.join(PLUGIN_DIR, name)).read())
            for node in ast.walk(tree):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                           [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f'{name}: {m}' for m in modules if m.split('.')[0] in ('swift', 'ddapo_swift')]
        assert offenders == []

    def test_reward_class_reaches_trainer_only_through_adapter(self):
        source = inspect.getsource(importlib.import_module('ddapo_attention_reward'))
        for attribute in ('.template', '.accelerator', '.args', '.state', '._metrics', 'gather_object', 'orms'):
            assert attribute not in source, attribute


class TestRewardRows:
    """Edge cases: the kwargs that are not rows are left out, a kwarg that is not a column fails naming it."""

    def test_rows(self):
        rows = reward_rows({'trainer': object(), 'trainer_state': None, 'trajectory_inputs': {},
                            'messages': [['a'], ['b']], 'solution': ['x', None]}, 2)
        assert rows == [{'messages': ['a'], 'solution': 'x'}, {'messages': ['b'], 'solution': None}]

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


def test_adapter_module_docstring_names_its_parts():
    """The data-flow diagram of ddapo_swift names what the module defines."""
    for name in ('SwiftTrainer', 'model_spec', 'SystemTurns', 'reward_rows', 'encode_completion', 'policy_forward',
                 'token_weight_store'):
        assert name in ddapo_swift.__doc__ and hasattr(ddapo_swift, name)
