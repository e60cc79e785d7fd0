"""The import rules of docs/architecture.md, enforced.

Each package is imported with all its modules in a fresh interpreter, and
the heavy libraries it must not pull in are looked for in sys.modules; the
sources are read for `import tensorflow` outside vit_jax/data.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'vit_jax'
# package (or program module) -> libraries that importing it must not load.
FORBIDDEN = {
    'vit_jax.base': ('jax', 'flax', 'optax', 'orbax', 'tensorflow', 'PIL'),
    'vit_jax.cli': ('jax', 'flax', 'optax', 'orbax', 'tensorflow'),
    'vit_jax.models': ('optax', 'orbax', 'tensorflow', 'PIL'),
    'vit_jax.checkpoint': ('flax', 'optax', 'orbax', 'tensorflow', 'PIL'),
    'vit_jax.serving': ('flax', 'optax', 'orbax', 'tensorflow'),
    'vit_jax.parallel': ('flax', 'optax', 'orbax', 'tensorflow'),
    'vit_jax.runs': ('flax', 'optax', 'tensorflow', 'PIL'),
    'vit_jax.sources': ('optax', 'tensorflow', 'torch'),
    'vit_jax.interop': ('optax', 'orbax', 'tensorflow', 'torch'),
    'vit_jax.evaluation': ('optax', 'orbax', 'tensorflow'),
    'vit_jax.export': ('tensorflow',),
    'vit_jax.predict': ('flax', 'optax', 'orbax', 'tensorflow'),
    'vit_jax.inspect': ('tensorflow',),
    'vit_jax.evaluate': ('flax', 'tensorflow'),
    'vit_jax.planning': ('tensorflow',),
    'vit_jax.plan': ('tensorflow',),
    'vit_jax.data.presets': ('tensorflow', 'jax'),
    'vit_jax.training.setup': ('tensorflow',),
    'vit_jax.training.programs': ('tensorflow',),
}
_SCRIPT = '''
import importlib, pkgutil, sys
module = importlib.import_module({name!r})
for info in pkgutil.walk_packages(getattr(module, '__path__', []),
                                  module.__name__ + '.'):
  importlib.import_module(info.name)
print(' '.join(m for m in {forbidden!r} if m in sys.modules))
'''


@pytest.mark.parametrize('name', sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_allows(name):
  result = subprocess.run(
      [sys.executable, '-c', _SCRIPT.format(name=name,
                                            forbidden=FORBIDDEN[name])],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == [], (
      f'importing {name} loads {result.stdout.split()}; see '
      'docs/architecture.md for what each layer may import')


def _imported_modules(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
  return names


def test_only_the_data_package_imports_tensorflow():
  offenders = sorted(
      str(path.relative_to(REPO)) for path in PACKAGE.rglob('*.py')
      if 'data' not in path.relative_to(PACKAGE).parts[:1]
      and any(m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')
              for m in _imported_modules(path)))
  assert offenders == []


def test_every_module_is_mapped_in_docs_architecture():
  doc = (REPO / 'docs' / 'architecture.md').read_text()
  missing = sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob('*.py')
                   if f'`{p.relative_to(REPO)}`' not in doc)
  assert missing == [], 'add these to docs/architecture.md'
