"""Tests of ccf_jax.checkpoint and ccf_jax.export against real Orbax and grain (no mocks).

A toy train state (sharded param matrices, an optax AdamW state, a raw PRNG key) on 8 virtual
CPU devices; the data iterator is a real grain DatasetIterator.
"""

import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

from flax import struct
import grain
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P, SingleDeviceSharding
import numpy as np
import optax
import pytest

from ccf_jax import checkpoint as ckpt
from ccf_jax.checkpoint import export as export_lib
from experiments import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = {'embed': P('fsdp', 'tensor'), 'w': P('tensor', 'fsdp')}  # Others replicated.


@struct.dataclass
class ToyState:
  step: jax.Array
  params: dict
  opt_state: object
  rng: jax.Array


def make_mesh(shape):
  return jax.make_mesh(shape, ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)


def _spec(path):
  return SPECS.get(str(getattr(path[-1], 'key', '')), P()) if path else P()


def shardings(tree, mesh):
  if mesh is None:
    return jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), tree)
  return jax.tree_util.tree_map_with_path(lambda p, _: NamedSharding(mesh, _spec(p)), tree)


def host_state(seed=0):
  """Random params (incompressible, so chunks live in data files) and non-zero Adam moments."""
  rng = np.random.default_rng(seed)
  params = {'embed': rng.normal(size=(256, 64)).astype(np.float32),
            'blk': {'w': rng.normal(size=(64, 128)).astype(np.float32),
                    'b': rng.normal(size=(128,)).astype(np.float32)},
            'norm': np.ones((64,), jax.numpy.bfloat16)}
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  _, opt_state = tx.update(jax.tree.map(lambda p: p * 0.1, params), opt_state, params)
  return ToyState(step=np.int32(seed), params=params, opt_state=jax.device_get(opt_state),
                  rng=np.asarray(jax.random.PRNGKey(seed)))


def place(state, mesh):
  return jax.device_put(state, shardings(state, mesh))


def abstract(state, mesh):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      state, shardings(state, mesh))


def assert_bitwise_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def make_iter():
  return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def take(it, n):
  return [next(it).tolist() for _ in range(n)]


def make_config(**ck):
  c = base.get_config()
  c.checkpoint.update(dict(every=2, keep_last=3, keep_every=0, async_save=False), **ck)
  return c


def no_init():
  pytest.fail('init_fn must not be called when a good checkpoint exists')


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A workdir with steps 2 and 4 (states seeded 2 and 4; iterator 2 and 4 batches in)."""
  workdir = str(tmp_path_factory.mktemp('saved'))
  mesh = make_mesh((2, 2, 2))
  mgr = ckpt.CheckpointManager(workdir, make_config())
  it = make_iter()
  for step in (2, 4):
    take(it, 2)
    assert mgr.maybe_save(step, place(host_state(step), mesh), it,
                          extra={'tokens_seen': step * 100})
  mgr.close()
  return workdir


def copy_workdir(src, tmp_path):
  dst = str(tmp_path / 'work')
  shutil.copytree(src, dst)
  return dst


def biggest_file(step_dir):
  files = [f for f in glob.glob(f'{step_dir}/state/**/*', recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def flip_middle(path, n=8):
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.seek(size // 2)
    data = f.read(n)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xFF for b in data))


# ------------------------------------------------------------------------------------- round trip
def test_async_roundtrip_is_bitwise_and_resumes_data_position(tmp_path):
  mesh = make_mesh((2, 2, 2))
  host = host_state(7)
  state = place(host, mesh)
  it = make_iter()
  take(it, 3)
  mgr = ckpt.CheckpointManager(str(tmp_path), make_config(async_save=True))
  assert mgr.latest_step() is None
  fresh, step, info = mgr.restore_or_init(abstract(host, mesh), lambda: 'fresh', it)
  assert (fresh, step, info.status, info.skipped) == ('fresh', 0, 'initialized', [])
  assert mgr.maybe_save(2, state, it, extra={'tokens_seen': 1234, 'tokenizer_path': '/tok.model'})
  expected = take(it, 3)  # Advancing the iterator while the save runs must not leak into it.
  for x in jax.tree.leaves(state):  # As if the next train step donated the buffers.
    x.delete()
  mgr.close()

  mgr = ckpt.CheckpointManager(str(tmp_path), make_config())
  it2 = make_iter()
  target = abstract(host, make_mesh((2, 2, 2)))
  restored, step, info = mgr.restore_or_init(target, no_init, it2)
  assert (step, info.status, info.skipped) == (2, 'restored', [])
  assert_bitwise_equal(restored, host)
  for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert x.sharding.is_equivalent_to(t.sharding, x.ndim)
  assert take(it2, 3) == expected
  md = info.metadata
  assert md['step'] == 2 and md['tokens_seen'] == 1234
  assert md['extra']['tokenizer_path'] == '/tok.model'
  assert md['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert set(md['versions']) >= {'jax', 'flax', 'orbax_checkpoint', 'grain'}
  assert md['saved_at_unix'] > 0 and 'params.embed' in md['fingerprint']
  assert info.config['checkpoint']['every'] == 2 and info.config['model']['d_model'] == 128
  assert 'restored at step 2' in str(info)
  mgr.close()


def reference_checksum(x) -> int:
  """The positional checksum in plain numpy (uint32 arithmetic wraps as on device)."""
  x = np.asarray(x).reshape(-1)
  u = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint32)
  h = u ^ (np.arange(x.size, dtype=np.uint32) * np.uint32(0x9E3779B1))
  h = (h ^ (h >> np.uint32(16))) * np.uint32(0x85EBCA6B)
  h = (h ^ (h >> np.uint32(13))) * np.uint32(0xC2B2AE35)
  h = h ^ (h >> np.uint32(16))
  return int(h.sum(dtype=np.uint64) % 2**32)


def test_fingerprint_equals_a_numpy_reference_on_host_chunks_and_sharded_arrays(monkeypatch):
  """Host arrays are hashed in padded chunks (bounded memory), device arrays whole under their
  sharding; both must give the checksum of the formula, and one flipped bit must change it."""
  from ccf_jax.checkpoint import integrity
  monkeypatch.setattr(integrity, '_CHUNK', 1000)  # Several chunks, a padded or clamped tail.
  rng = np.random.default_rng(0)
  leaves = {'f32': rng.normal(size=(37, 129)).astype(np.float32),
            'bf16': rng.normal(size=(2501,)).astype(jax.numpy.bfloat16),
            'i8': rng.integers(-128, 127, size=(3, 5, 7), dtype=np.int8),
            'u16': rng.integers(0, 2**16, size=(2000,), dtype=np.uint16),  # A whole chunk twice.
            'empty': np.zeros((0, 3), np.float32),
            'one': np.float32(2.5)}
  mesh = make_mesh((2, 2, 2))
  sharded = jax.device_put(leaves['f32'][:32, :128], NamedSharding(mesh, P('fsdp', 'tensor')))
  one_device = jax.device_put(leaves['f32'], jax.devices()[0])  # Read in slices, tail clamped.
  got = ckpt.fingerprint({'a': leaves, 'sharded': sharded, 'one_device': one_device})
  assert got['one_device'] == reference_checksum(leaves['f32'])
  for k, v in leaves.items():
    assert got[f'a.{k}'] == reference_checksum(v), k
  assert got['sharded'] == reference_checksum(leaves['f32'][:32, :128])
  whole = integrity._leaf_fingerprint(sharded)  # The device path, as on an accelerator.
  assert int(np.asarray(whole.addressable_data(0))) == got['sharded']
  flipped = leaves['f32'].copy()
  flipped.view(np.uint32)[20, 100] ^= 1 << 7
  assert ckpt.fingerprint({'x': flipped})['x'] != got['a.f32']


@pytest.mark.parametrize('shape', [(1, 8, 1), (8, 1, 1), None], ids=['1x8x1', '8x1x1', 'single'])
def test_restore_onto_a_different_mesh(saved, shape):
  mesh = make_mesh(shape) if shape else None
  target = abstract(host_state(4), mesh)
  restored, step, _ = ckpt.restore_from(saved, target)
  assert step == 4
  assert_bitwise_equal(restored, host_state(4))
  for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert x.sharding.is_equivalent_to(t.sharding, x.ndim)
  if shape == (1, 8, 1):
    assert restored.params['embed'].addressable_shards[0].data.shape == (32, 64)


def test_restore_from_step_dir_and_clear_errors(saved, tmp_path):
  target = abstract(host_state(2), make_mesh((2, 2, 2)))
  it = make_iter()
  state, step, info = ckpt.restore_from(os.path.join(saved, 'checkpoints', '2'), target, it)
  assert step == 2 and info.metadata['tokens_seen'] == 200
  assert_bitwise_equal(state, host_state(2))
  ref = make_iter()
  take(ref, 2)
  assert take(it, 2) == take(ref, 2)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    ckpt.restore_from(str(tmp_path / 'nope'), target)
  with pytest.raises(FileNotFoundError, match='No finished checkpoint'):
    ckpt.restore_from(str(tmp_path), target)


def test_keep_last_and_keep_every(tmp_path):
  mgr = ckpt.CheckpointManager(str(tmp_path), make_config(every=2, keep_last=2, keep_every=6,
                                                          async_save=True))
  state = place(host_state(0), make_mesh((2, 2, 2)))
  saved_steps = [s for s in range(14) if mgr.maybe_save(s, state)]
  assert saved_steps == [2, 4, 6, 8, 10, 12]  # Step 0 only when forced.
  assert mgr.maybe_save(13, state, force=True)
  assert not mgr.maybe_save(13, state, force=True)  # Already saved: no error, no rewrite.
  mgr.wait()
  assert mgr.all_steps() == [6, 12, 13] and mgr.latest_step() == 13
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['12', '13', '6']
  mgr.close()


# ------------------------------------------------------------------------------------ corruption
def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    'truncated_array_file': lambda d: _truncate(biggest_file(d)),
    'flipped_array_bytes': lambda d: flip_middle(biggest_file(d)),
    'deleted_array_file': lambda d: os.remove(biggest_file(d)),
    'truncated_state_metadata': lambda d: _truncate(os.path.join(d, 'state', '_METADATA')),
    'missing_state_item': lambda d: shutil.rmtree(os.path.join(d, 'state')),
    'missing_data_item': lambda d: shutil.rmtree(os.path.join(d, 'data')),
    'bad_metadata_json': lambda d: open(os.path.join(d, 'metadata', 'metadata'), 'w').write('{"st'),
}


@pytest.mark.parametrize('kind', sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_previous(saved, tmp_path, caplog, kind):
  workdir = copy_workdir(saved, tmp_path)
  bad = os.path.join(workdir, 'checkpoints', '4')
  CORRUPTIONS[kind](bad)
  mgr = ckpt.CheckpointManager(workdir, make_config())
  it = make_iter()
  with caplog.at_level(logging.WARNING):
    state, step, info = mgr.restore_or_init(abstract(host_state(2), make_mesh((2, 2, 2))),
                                            no_init, it)
  assert step == 2 and info.path.endswith(os.path.join('checkpoints', '2'))
  assert_bitwise_equal(state, host_state(2))
  ref = make_iter()
  take(ref, 2)
  assert take(it, 3) == take(ref, 3)  # The data position of step 2, not of the bad step 4.
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(bad in w and 'corrupt' in w for w in warnings), warnings
  if kind == 'flipped_array_bytes':
    # Flipped bytes in a raw chunk are read silently by Orbax and caught by our checksum; in a
    # compressed chunk (which chunk lies mid-file depends on the order the async writes finished)
    # the decompressor refuses them first. Never read as data either way.
    assert re.search('checksum|ZSTD|ecompress', info.skipped[0]['error']), info.skipped[0]
  assert info.skipped[0]['moved_to'] == bad + ckpt.CORRUPT_SUFFIX
  assert os.path.isdir(bad + ckpt.CORRUPT_SUFFIX) and not os.path.exists(bad)
  assert mgr.all_steps() == [2]
  # Training resumes from 2 and reaches 4 again: the new save must not collide with the bad one.
  assert mgr.maybe_save(4, place(host_state(4), make_mesh((2, 2, 2))), it)
  mgr.close()
  assert ckpt.CheckpointManager(workdir, make_config()).latest_step() == 4


def test_all_corrupt_is_an_error_unless_a_fresh_start_is_allowed(saved, tmp_path, caplog):
  """Every checkpoint corrupt: an error naming them and the flag, never a silent step-0 restart;
  with allow_fresh_start it initialises and leaves the data iterator where it was."""
  workdir = copy_workdir(saved, tmp_path)
  for step in ('2', '4'):
    flip_middle(biggest_file(os.path.join(workdir, 'checkpoints', step)))
  it = make_iter()
  take(it, 1)
  position = it.get_state()
  mgr = ckpt.CheckpointManager(workdir, make_config())
  with pytest.raises(ckpt.CorruptCheckpointError, match='every checkpoint') as err:
    mgr.restore_or_init(abstract(host_state(2), None), lambda: 'fresh', it)
  assert '4.corrupt' in str(err.value) and '--allow_fresh_start' in str(err.value)
  mgr.close()
  for step in ('2', '4'):  # Put them back to take the allowed path over the same damage.
    os.rename(os.path.join(workdir, 'checkpoints', step + ckpt.CORRUPT_SUFFIX),
              os.path.join(workdir, 'checkpoints', step))
  mgr = ckpt.CheckpointManager(workdir, make_config())
  with caplog.at_level(logging.WARNING):
    state, step, info = mgr.restore_or_init(abstract(host_state(2), None), lambda: 'fresh', it,
                                            allow_fresh_start=True)
  assert (state, step, info.status) == ('fresh', 0, 'initialized')
  assert [d['step'] for d in info.skipped] == [4, 2]
  assert it.get_state() == position
  assert mgr.all_steps() == []


def test_shape_mismatch_raises_and_keeps_checkpoint(saved, tmp_path):
  workdir = copy_workdir(saved, tmp_path)
  other = host_state(2)
  other = other.replace(params={**other.params, 'embed': np.zeros((128, 64), np.float32)})
  mgr = ckpt.CheckpointManager(workdir, make_config())
  with pytest.raises(ckpt.CheckpointMismatchError, match=r'params\.embed: checkpoint \(256, 64\)'):
    mgr.restore_or_init(abstract(other, None), no_init)
  assert mgr.all_steps() == [2, 4]  # Nothing renamed: a config change is not corruption.


def test_leftover_tmp_dir_of_interrupted_save_is_ignored(saved, tmp_path, caplog):
  workdir = copy_workdir(saved, tmp_path)
  tmp = os.path.join(workdir, 'checkpoints', '6.orbax-checkpoint-tmp-1700000000')
  shutil.copytree(os.path.join(workdir, 'checkpoints', '4'), tmp)
  _truncate(biggest_file(tmp))
  with caplog.at_level(logging.WARNING):
    mgr = ckpt.CheckpointManager(workdir, make_config())
  assert any('interrupted save' in r.getMessage() for r in caplog.records)
  assert mgr.all_steps() == [2, 4]
  _, step, info = mgr.restore_or_init(abstract(host_state(4), None), no_init)
  assert step == 4 and not info.skipped
  mgr.close()
  assert not os.path.exists(tmp)  # Orbax cleans tmp dirs when a manager starts.


_KILLED_SAVER = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    import jax.numpy as jnp
    from ccf_jax import checkpoint as ckpt
    mgr = ckpt.CheckpointManager(sys.argv[1], None, every=1, async_save=True)
    w = jnp.arange(4 << 20, dtype=jnp.float32)  # 16 MB: the write takes far longer than a kill.
    state = lambda s: {'step': jnp.int32(s), 'params': {'w': w * s}}
    mgr.maybe_save(1, state(1))
    mgr.wait()
    mgr.maybe_save(2, state(2))  # Async: returns once the arrays are on host; files follow.
    os.kill(os.getpid(), signal.SIGKILL)
''')


def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
  script = tmp_path / 'saver.py'
  script.write_text(_KILLED_SAVER)
  workdir = tmp_path / 'work'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  proc = subprocess.run([sys.executable, str(script), str(workdir), REPO], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  leftovers = glob.glob(str(workdir / 'checkpoints' / '2.orbax-checkpoint-tmp*'))
  assert leftovers, 'the kill should land mid-save (a tmp dir of step 2 left behind)'
  mgr = ckpt.CheckpointManager(str(workdir), None, every=1)
  assert mgr.all_steps() == [1]
  mesh = make_mesh((2, 2, 2))
  target = {'step': jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(mesh, P())),
            'params': {'w': jax.ShapeDtypeStruct((4 << 20,), np.float32,
                                                 sharding=NamedSharding(mesh, P('fsdp')))}}
  state, step, info = mgr.restore_or_init(target, no_init)
  assert step == 1 and not info.skipped
  np.testing.assert_array_equal(np.asarray(state['params']['w'])[:5], np.arange(5))
  assert mgr.maybe_save(2, state)  # The interrupted step can be written again.
  mgr.close()


# ----------------------------------------------------------------------------------------- export
@pytest.fixture(scope='module')
def tokenizer_files(tmp_path_factory):
  from ccf_jax.data import tokenizer as tok_lib
  d = tmp_path_factory.mktemp('tok')
  return tok_lib.train_tokenizer(['To be, or not to be, that is the question.\n' * 20], 300,
                                 str(d / 'sp.model')).model_path  # Writes sp.json beside it.


@pytest.fixture(scope='module')
def export_workdir(tmp_path_factory, tokenizer_files):
  workdir = str(tmp_path_factory.mktemp('exp_run'))
  mgr = ckpt.CheckpointManager(workdir, make_config())
  for step in (2, 4):
    mgr.maybe_save(step, place(host_state(step), make_mesh((2, 2, 2))), make_iter(),
                   extra={'tokens_seen': 10 * step, 'tokenizer_path': tokenizer_files})
  mgr.close()
  return workdir


def test_export_and_load_roundtrip(export_workdir, tokenizer_files, tmp_path):
  out = str(tmp_path / 'export')
  export_lib.export(export_workdir, out)
  assert sorted(os.listdir(out)) == ['config.json', 'export_info.json', 'params',
                                     'tokenizer.json', 'tokenizer.model']
  assert not [f for f in os.listdir(tmp_path) if f.startswith('.')]  # No tmp dirs left.
  params, config, tok = export_lib.load_export(out)
  assert_bitwise_equal(params, host_state(4).params)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
  assert config == json.loads(make_config().to_json_best_effort())
  assert open(tok, 'rb').read() == open(tokenizer_files, 'rb').read()
  info = json.load(open(os.path.join(out, export_lib.INFO_JSON)))
  assert info['tokenizer']['kind'] == 'sentencepiece' and info['tokenizer']['vocab_size'] == 300
  assert info['tokenizer']['file'] == 'tokenizer.model'
  assert export_lib.tokenizer_of(out) == (tok, info['tokenizer'])
  mesh = make_mesh((1, 8, 1))
  target = abstract(host_state(4).params, mesh)
  sharded, _, _ = export_lib.load_export(out, target)
  assert_bitwise_equal(sharded, host_state(4).params)
  assert sharded['embed'].sharding.is_equivalent_to(target['embed'].sharding, 2)
  with pytest.raises(export_lib.ExportError, match='already exists.*--overwrite'):
    export_lib.export(export_workdir, out)
  export_lib.export(export_workdir, out, step=2, overwrite=True)
  assert_bitwise_equal(export_lib.load_export(out)[0], host_state(2).params)


def test_export_cli(export_workdir, tmp_path):
  out = tmp_path / 'cli_export'
  proc = subprocess.run(
      [sys.executable, '-m', 'ccf_jax.export', f'--workdir={export_workdir}', f'--out={out}',
       '--step=2'], cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''},
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'exported step 2' in proc.stdout
  proc = subprocess.run(
      [sys.executable, '-m', 'ccf_jax.export', f'--workdir={tmp_path / "nope"}', f'--out={out}2'],
      cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''},
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and 'export failed: Checkpoint path' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert_bitwise_equal(export_lib.load_export(str(out))[0], host_state(2).params)


def test_export_carries_a_tokenizer_json(saved, tmp_path):
  """A run on a Hugging Face tokenizer.json exports it with its tokenizer_config.json under hf/
  and records it; loaders find it."""
  from ccf_jax import data
  src = os.path.join(REPO, 'tests', 'fixtures', 'tokenizers', 'bpe', 'tokenizer.json')
  out = str(export_lib.export(saved, str(tmp_path / 'e'), tokenizer=src))
  assert sorted(os.listdir(os.path.join(out, 'hf'))) == ['tokenizer.json', 'tokenizer_config.json']
  assert not os.path.exists(os.path.join(out, 'tokenizer.model'))
  path, rec = export_lib.tokenizer_of(out)
  assert path == os.path.join(out, 'hf', 'tokenizer.json') == export_lib.load_export(out)[2]
  tok = data.load_tokenizer(path)
  assert rec == dict(data.load_tokenizer(src).record(), file='hf/tokenizer.json')
  assert rec['kind'] == 'hf' and tok.eos_id == rec['eos_id'] == 0 and tok.chat_template


def test_export_errors(export_workdir, saved, tmp_path):
  with pytest.raises(export_lib.ExportError, match='does not exist.*python -m ccf_jax.export'):
    export_lib.load_export(str(tmp_path / 'missing'))
  with pytest.raises(export_lib.ExportError, match='not a ccf_jax export.*training workdir'):
    export_lib.load_export(export_workdir)
  with pytest.raises(export_lib.ExportError, match='No tokenizer is recorded.*--tokenizer='):
    export_lib.export(saved, str(tmp_path / 'e0'))
  out = str(export_lib.export(saved, str(tmp_path / 'e1'), require_tokenizer=False))
  assert export_lib.load_export(out)[2] is None
  with pytest.raises(export_lib.ExportError, match='tokenizer recorded.*does not exist'):
    export_lib.export(saved, str(tmp_path / 'e2'), tokenizer=str(tmp_path / 'nope.model'))

  good = str(export_lib.export(export_workdir, str(tmp_path / 'e3')))
  broken = str(tmp_path / 'e4')
  shutil.copytree(good, broken)
  open(os.path.join(broken, 'config.json'), 'w').write('{"model": ')
  with pytest.raises(export_lib.ExportError, match='config.json.*not valid JSON.*--overwrite'):
    export_lib.load_export(broken)
  shutil.rmtree(broken)
  shutil.copytree(good, broken)
  flip_middle(max((f for f in glob.glob(f'{broken}/params/**/*', recursive=True)
                   if os.path.isfile(f)), key=os.path.getsize))
  with pytest.raises(export_lib.ExportError, match='checksum|unreadable'):
    export_lib.load_export(broken)
  shutil.rmtree(os.path.join(broken, 'params'))
  with pytest.raises(export_lib.ExportError, match='no params/'):
    export_lib.load_export(broken)
  with pytest.raises(ckpt.CheckpointMismatchError, match='embed'):
    export_lib.load_export(good, {'embed': jax.ShapeDtypeStruct((3, 3), np.float32)})
