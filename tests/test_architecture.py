"""The package's imports point one way and form no circle.

Every `import` of a ccf_jax module (at the top of a file or inside a function alike) is an edge;
`LAYERS` below is the one declaration of the order, lowest first. A module may import from its own
layer and from layers below it, never from a layer above, and no chain of imports may lead back to
where it started. The test parses source files, so it needs no JAX and runs in milliseconds.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'ccf_jax'

# Lowest first. A name is a subpackage (`ccf_jax/<name>/`) or a top-level module (`<name>.py`).
LAYERS = (
    ('core',),  # config validation and derived fields, sharding rules, analytic FLOP formulas
    ('model',),  # layers, attention, the plain decoder, the Arch record
    ('ccf',),  # the paper's parts: masks, encoder/memory, incremental decoding, reservoir, FLOPs
    ('registry',),  # model.arch name -> Arch, over model/ and ccf/
    ('tasks',),  # synthetic tasks (passkey)
    ('data',),  # corpora, tokenizers, the grain pipeline
    ('checkpoint',),  # Orbax checkpoints and the export format
    ('interop',),  # Hugging Face weights and tokenizers
    ('train',),  # trainer loop, step, optimizer, metrics, timing, AOT plan
    ('inference',),  # the streaming engine and generation
    ('eval',),  # evaluation protocols, report, comparison
    ('bench',),  # benchmarks
    ('export', 'evaluate', 'generate', 'convert', 'plan', 'tokenizer'),  # thin entry points
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict:
  """{dotted module name: path} of every module in the package."""
  out = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = path.relative_to(ROOT).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set:
  """The ccf_jax modules `name` imports (a `from pkg import mod` names the module itself)."""
  found = set()
  is_pkg = path.name == '__init__.py'
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.split('.')[0] == 'ccf_jax')
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = name.split('.') if is_pkg else name.split('.')[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = '.'.join(parts + ([base] if base else []))
      if base.split('.')[0] != 'ccf_jax':
        continue
      for a in node.names:
        found.add(f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base)
  return {m for m in found if m in modules and m != name}


def _graph() -> dict:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str):
  parts = module.split('.')
  return RANK.get(parts[1]) if len(parts) > 1 else None


def test_every_package_and_top_level_module_has_a_layer():
  unplaced = sorted({m.split('.')[1] for m in _modules() if '.' in m} - set(RANK))
  assert not unplaced, f'add these to LAYERS in {__file__}: {unplaced}'


def test_imports_point_down_the_layers():
  upward = []
  for src, targets in _graph().items():
    for dst in targets:
      if _layer(src) is not None and _layer(dst) is not None and _layer(dst) > _layer(src):
        upward.append(f'{src} -> {dst}')
  assert not upward, 'imports against the declared order:\n' + '\n'.join(sorted(upward))


def _cycles(graph: dict) -> list:
  """Strongly connected components with more than one module (Tarjan), as sorted lists."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_circles():
  assert not _cycles(_graph())


@pytest.mark.parametrize('graph,want', [
    ({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}, [['a', 'b', 'c']]),
    ({'a': {'b'}, 'b': set(), 'c': {'b'}}, []),
])
def test_cycle_finder_on_known_graphs(graph, want):
  assert _cycles(graph) == want


def test_upward_import_is_detected(tmp_path):
  """The parser sees an import inside a function body, the form that used to hide a circle."""
  mod = tmp_path / 'm.py'
  mod.write_text('def f():\n  from ccf_jax.train import trainer\n  return trainer\n')
  got = _imports('ccf_jax.core.m', mod, {'ccf_jax.train.trainer': None, 'ccf_jax.train': None})
  assert got == {'ccf_jax.train.trainer'}
  assert _layer('ccf_jax.train.trainer') > _layer('ccf_jax.core.m')
