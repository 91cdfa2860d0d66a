"""The worked examples in the docstrings of the reward's modules, run as doctests (a failing example fails here)."""
import doctest
import importlib
import os

import pytest

from conftest import PLUGIN_DIR

# every module of the package whose docstrings hold an example, found by reading the files (a new module's examples
# run without a list to update), and the scripts beside it
PACKAGE = sorted('.'.join(os.path.relpath(os.path.join(folder, name), PLUGIN_DIR)[:-3].split(os.sep))
                 for folder, _, names in os.walk(os.path.join(PLUGIN_DIR, 'ddapo')) for name in names
                 if name.endswith('.py') and '>>>' in open(os.path.join(folder, name)).read())
SCRIPTS = ['ddapo_demo', 'swift_patches.grpo_token_weights', 'validity_demo', 'ablation_ddapo_weight', 'zoom_scheduler']


def test_package_examples_found():
    assert {'ddapo.core.formulas', 'ddapo.core.variants', 'ddapo.core.token_weights', 'ddapo.ms_swift.encoding'} <= \
        set(PACKAGE)


@pytest.mark.parametrize('name', PACKAGE + SCRIPTS)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
