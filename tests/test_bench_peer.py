"""`python -m ccf_jax.bench peer`: the ccf_jax rows always print, and the torch peer is measured
when its optional packages are installed or reported skipped when not (CI has no torch).

The entry point runs in a subprocess on a shrunk model (`--peer_shapes=config` times --config
with its overrides), one round of one step: the children's compilation dominates.
"""

import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from ccf_jax.bench import peer
from ccf_jax.core import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config.model.d_model=32', '--config.model.num_layers=2', '--config.model.num_heads=4',
         '--config.model.num_kv_heads=2', '--config.model.head_dim=8', '--config.model.mlp_dim=64',
         '--config.model.vocab_size=64', '--config.data.seq_len=32', '--config.data.batch_size=2']


def test_bench_peer_prints_rows_and_a_summary():
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  r = subprocess.run([sys.executable, '-m', 'ccf_jax.bench', 'peer', '--config=experiments/tiny.py',
                      '--peer_shapes=config', '--peer_rounds=1', '--steps=1', *SMALL,
                      '--peer_variant=v=--xla_cpu_enable_fast_math=false '
                      '--config.model.scan_layers=True'], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
  by = {(x['bench'], x.get('system')): x for x in rows}
  jx = by['peer', 'ccf_jax']
  assert jx['batch'] == 2 and jx['length'] == 32 and jx['params'] > 0 and jx['tokens_per_s'] > 0
  assert jx['peak_rss_gb'] > 0.05 and jx['flops_formula'] == 'decoder_train_flops'
  assert jx['cpu_s'] > 0
  summary = by['peer_summary', None]
  assert summary['ccf_jax']['tokens_per_s'] == jx['tokens_per_s']
  variant = by['peer', 'ccf_jax+v']  # Scanned layers, XLA_FLAGS appended, in its own child.
  assert variant['params'] == jx['params'] and variant['tokens_per_s'] > 0
  assert summary['ccf_jax+v']['speedup_vs_ccf_jax'] == round(jx['step_s'] / variant['step_s'], 3)
  plain = by['peer', 'jax_plain']  # Always run: it needs nothing but JAX.
  assert plain['params'] == jx['params'] and plain['peak_rss_gb'] > 0.05
  assert summary['vs_jax_plain']['ratio_tokens_per_s'] == round(plain['step_s'] / jx['step_s'], 3)
  pt = by['peer', 'torch']
  if importlib.util.find_spec('torch') and importlib.util.find_spec('transformers'):
    assert pt['params'] == jx['params'] and summary['vs_torch']['ratio_tokens_per_s'] > 0
  else:
    assert 'pip install -r requirements-peer.txt' in pt['skipped']
    assert 'peer skipped: pip install -r requirements-peer.txt' in r.stderr
    assert summary['vs_torch'] == pt['skipped']


def test_shapes_are_the_issue_shapes_on_the_config():
  from experiments import tiny
  base = ml_collections.ConfigDict(tiny.get_config().to_dict())
  s3 = peer.shape_config(base, 'S3')
  m = s3.model
  assert (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
          m.vocab_size, m.tie_embeddings) == (576, 30, 9, 3, 64, 1536, 49152, True)
  assert (s3.data.seq_len, s3.data.batch_size, m.dtype) == (512, 2, 'float32')
  s2 = peer.shape_config(base, 'S2')
  assert s2.model.num_kv_heads == 8 and s2.data.seq_len == 1024 and s2.model.max_position >= 1024
  assert peer.shape_config(base, 'CCF8x').model.arch == 'ccf'
  assert peer.shape_config(base, 'config').model.d_model == base.model.d_model


def test_summary_ratio_is_ccf_jax_over_torch_tokens_per_s():
  jx = {'step_s': 1.0, 'block_s': [1.0, 2.0], 'tokens_per_s': 8.0, 'model_gflops_per_s': 1.0,
        'peak_rss_gb': 2.0, 'cpu_s': 2.0}
  pt = {'step_s': 0.5, 'block_s': [0.5, 1.5], 'tokens_per_s': 16.0, 'model_gflops_per_s': 2.0,
        'peak_rss_gb': 1.0, 'cpu_s': 1.0}
  s = peer.summary_row('S1', {'ccf_jax': jx, 'torch': pt})['vs_torch']
  assert s['ratio_tokens_per_s'] == 0.5  # ccf_jax half as fast.
  assert s['ratio_paired_median'] == 0.625  # Per round: 0.5, 0.75.
  assert s['ratio_peak_rss'] == 2.0 and s['ratio_cpu_s'] == 0.5
  assert peer.summary_row('CCF8x', {'ccf_jax': jx})['vs_jax_plain'].startswith('none')
  failed = peer.summary_row('S1', {'ccf_jax': {'error': 'exit 1: boom'}, 'torch': pt})
  assert failed['vs_torch'] == 'ccf_jax failed: exit 1: boom'  # The cause, not 'not run'.


def test_plain_jax_peer_is_the_same_model_and_loss():
  """The plain-JAX peer on ccf_jax's own parameters: the same loss and gradients as ccf_jax's
  decoder (so the two time the same computation), tied and untied heads, grouped kv heads."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from experiments import tiny
  from ccf_jax.bench import plain_jax
  from ccf_jax.model import arch, decoder
  for tie in (False, True):
    cfg = tiny.get_config()
    for a in SMALL:
      section, field, value = a[len('--config.'):].replace('=', '.').split('.')
      cfg[section][field] = type(cfg[section][field])(value)
    cfg.model.tie_embeddings = tie
    params = decoder.init_params(cfg.model, 0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 32)), jnp.int32)
    batch = {'tokens': tokens, 'loss_mask': jnp.ones((2, 32))}

    def ccf(p):
      loss_sum, n, _ = arch.decoder_loss(cfg, p, batch, None)
      return loss_sum / n

    want, g_want = jax.value_and_grad(ccf)(params)
    mapped = lambda p: plain_jax.from_ccf_jax(cfg.model, p)
    got, g_got = jax.value_and_grad(lambda p: plain_jax.loss_fn(cfg.model, mapped(p), tokens))(
        params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), g_got, g_want)
    own = plain_jax.init(cfg.model, jax.random.key(0))
    assert jax.tree.map(jnp.shape, mapped(params)) == jax.tree.map(jnp.shape, own)
  cfg.model.sliding_window = 16  # A model the plain loop does not write: refused, not mistimed.
  with pytest.raises(ValueError, match='model.sliding_window is set'):
    plain_jax.time_steps(cfg, 1)


def test_variants_parse_and_refuse_malformed_entries():
  got = peer.parse_variants(['a=--xla_x=1 --xla_y=2', 'b_2=--config.model.scan_layers=False '
                             '--config.train.lr=1e-3 --config.model.attention_impl=xla'])
  assert got == {'a': ('--xla_x=1 --xla_y=2', {}),
                 'b_2': ('', {'model.scan_layers': False, 'train.lr': 1e-3,
                              'model.attention_impl': 'xla'})}
  for bad in (['--xla_x=1'], ['a=x=1'], ['a b=--xla_x=1'], ['a=--xla_x=1', 'a=--xla_y=1'], ['a='],
              ['a=--config.scan_layers=False'], ['a=--other=1']):
    with pytest.raises(config_lib.ConfigError, match='--peer_variant='):
      peer.parse_variants(bad)
  from experiments import tiny
  base = tiny.get_config()
  assert base.model.scan_layers is False  # tiny.py's own; the variant sets the other value.
  assert peer.variant_config(base, {'model.scan_layers': True}).model.scan_layers is True
  with pytest.raises(config_lib.ConfigError, match='no such field'):
    peer.variant_config(base, {'model.scan_layer': False})
