"""pyproject.toml installs every package of the reward (plugin.py itself is loaded by path)."""
import os

from conftest import PLUGIN_DIR, ROOT

try:
    import tomllib
except ImportError:  # Python 3.10: the test extra installs tomli there
    import tomli as tomllib


class TestPackages:
    """Edge case: a layer folder added to the package but not listed would import in a checkout and fail installed."""

    def test_every_package_listed(self):
        with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
            listed = set(tomllib.load(f)['tool']['setuptools']['packages'])
        present = {os.path.relpath(folder, PLUGIN_DIR).replace(os.sep, '.')
                   for folder, _, files in os.walk(os.path.join(PLUGIN_DIR, 'ddapo'))
                   if '__pycache__' not in folder and any(f.endswith('.py') for f in files)}
        assert present == listed - {'swift_patches'}
        assert all(os.path.exists(os.path.join(PLUGIN_DIR, p.replace('.', os.sep), '__init__.py')) for p in present)
