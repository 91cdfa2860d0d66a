"""The worked examples in the docstrings of the reward's modules, run as doctests (a failing example fails here)."""
import doctest
import importlib

import pytest


@pytest.mark.parametrize('name', ['ddapo.core.formulas', 'ddapo.core.diagnostics', 'ddapo.core.key_sets', 'ddapo.core.report',
                                  'ddapo.core.scorer', 'ddapo.core.row', 'ddapo.ms_swift.encoding',
                                  'ddapo.ms_swift.trainer_io', 'ddapo.ms_swift.families', 'ddapo_demo', 'swift_patches.grpo_token_weights',
                                  'ddapo.core.validity', 'ddapo.core.config', 'validity_demo', 'ablation_ddapo_weight',
                                  'zoom_scheduler'])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
