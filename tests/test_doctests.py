"""The worked examples in the docstrings of the reward's modules, run as doctests (a failing example fails here)."""
import doctest
import importlib

import pytest


@pytest.mark.parametrize('name', ['ddapo_formulas', 'ddapo_diagnostics', 'ddapo_key_sets', 'ddapo_report',
                                  'ddapo_scorer', 'ddapo_swift', 'ddapo_demo', 'swift_patches.grpo_token_weights'])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
