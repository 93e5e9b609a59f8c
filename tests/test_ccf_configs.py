"""The CCF experiment configs: they validate, have the stated sizes, and the 7B ones build and
trace abstractly on a 256-device mesh; bad CCF settings fail with errors that name the fix."""

import importlib
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType

from ccf_jax import registry as arch_lib
from ccf_jax.core import config_lib
from ccf_jax.model import decoder as model_lib
from ccf_jax.train import optim
from ccf_jax.core import sharding
from ccf_jax.train import step as ts
from experiments import tiny_ccf

LLAMA2_7B = 6_738_415_616  # Llama-2-7B's parameter count.


def counts(cfg):
  arch = arch_lib.get_arch(cfg)
  abstract = model_lib.abstract_params(arch.module_config(cfg), arch.module_cls)
  trainable, frozen = arch_lib.split_params(cfg, arch, abstract)
  return model_lib.param_count(trainable), model_lib.param_count(frozen)


@pytest.mark.parametrize('name,trainable,frozen', [
    ('tiny_ccf', 1_340_672, 0),  # Started from a tiny.py export, as every tiny_ccf variant.
    ('tiny_ccf_scratch', 1_340_672, 0),
    ('tiny_ccf_32x', 1_339_136, 0),
    ('tiny_ccf_passkey', 1_339_648, 0),  # c=8 distinct memory vectors instead of 16.
    ('tiny_ccf_adapter', 28_800, 1_311_872),  # The frozen base is exactly experiments/tiny.py.
    ('tiny_ccf_ae', 1_340_672, 0),  # tiny_ccf's model, trained to reconstruct.
    ('passkey_4k', 1_340_672, 0),  # tiny_ccf's model at T=32.
    ('passkey_16k', 1_340_672, 0),  # The same model at T=128.
    ('tiny_ccf_16k', 1_340_672, 0),  # tiny_ccf's model, language modelling at T=128.
    ('passkey_4k_32x', 1_339_136, 0),  # c=4, as tiny_ccf_32x.
    ('passkey_512', 1_340_672, 0),  # passkey_4k's first stage, T=4.
    ('passkey_512_32x', 1_339_136, 0),
])
def test_tiny_configs(name, trainable, frozen):
  cfg = importlib.import_module(f'experiments.{name}').get_config()
  config_lib.validate(cfg, 1)
  assert counts(cfg) == (trainable, frozen)
  tiny = importlib.import_module('experiments.tiny').get_config()
  assert model_lib.param_count(model_lib.abstract_params(tiny.model)) == 1_311_872
  for baseline in ('segment_local', 'full_attention'):  # The baselines in the same config.
    cfg.model.arch = baseline
    config_lib.validate(cfg, 1)
    assert counts(cfg) == (1_311_872, 0)
    assert arch_lib.get_arch(cfg).train_flops(cfg, 8) > 0


@pytest.mark.parametrize('name', ['passkey_4k', 'passkey_4k_32x', 'passkey_16k', 'tiny_ccf_16k'])
def test_staged_configs_start_from_a_stage_of_the_same_model(name):
  """A stage's `init.params_only` (runs/<stage>/export, trained by launch/_base.sh from
  experiments/<stage>.py) holds parameters of that stage's model: it must be this config's model,
  memory tokens included, or the import fails on the shapes."""
  cfg = importlib.import_module(f'experiments.{name}').get_config()
  stage = os.path.basename(os.path.dirname(cfg.init.params_only.rstrip('/')))
  prev = importlib.import_module(f'experiments.{stage}').get_config()
  shapes = lambda c: jax.tree.map(lambda a: a.shape, model_lib.abstract_params(
      arch_lib.get_arch(c).module_config(c), arch_lib.get_arch(c).module_cls))
  assert shapes(prev) == shapes(cfg)
  assert (prev.ccf.num_memory, prev.ccf.segment_len) == (cfg.ccf.num_memory, cfg.ccf.segment_len)


SMOLLM2_135M = 134_515_008  # SmolLM2-135M's parameter count (tied embeddings).


@pytest.mark.parametrize('name,trainable', [('smollm2_ccf', 1_668_942),
                                            ('smollm2_ccf_full', SMOLLM2_135M + 1_668_942)])
def test_smollm2_configs(name, trainable):
  """The real-model recipes: SmolLM2-135M's shapes, a frozen base for the adapter (the count the
  trainer printed for the converted GGUF), everything trained in the full variant."""
  cfg = importlib.import_module(f'experiments.{name}').get_config()
  config_lib.validate(cfg, 1)
  frozen = SMOLLM2_135M if cfg.ccf.mode == 'adapter' else 0
  assert counts(cfg) == (trainable, frozen)
  assert cfg.ccf.memory_gate == 'tanh' and cfg.ccf.segment_len // cfg.ccf.num_memory == 8


@pytest.mark.parametrize('name', ['ccf_llama2_7b_8x', 'ccf_llama2_7b_32x'])
def test_7b_configs_build_abstractly_on_256_devices(name):
  cfg = importlib.import_module(f'experiments.{name}').get_config()
  config_lib.validate(cfg, 256)
  mesh = AbstractMesh((8, 32, 1), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)
  tx = optim.make_optimizer(cfg.train)
  with jax.sharding.use_abstract_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    abstract, shardings = ts.abstract_state_and_shardings(cfg, tx, mesh)
    trainable = model_lib.param_count(abstract.params)
    frozen = model_lib.param_count(abstract.frozen)
    assert frozen == LLAMA2_7B
    assert trainable == 32 * 4 * 2 * 4096 * 128 + 4096 + 4096  # 4 LoRAs x 32 layers + 2 vectors.
    assert 0.018 < trainable / (trainable + frozen) < 0.022  # ~2%.
    assert abstract.frozen['decoder']['embed'].dtype == jnp.bfloat16
    assert shardings.frozen['decoder']['layers']['mlp']['w_up'].spec[1] == 'fsdp'
    w = cfg.ccf.num_segments * cfg.ccf.segment_len
    assert w == 131_072
    batch = {'tokens': jax.ShapeDtypeStruct((cfg.data.batch_size, w), jnp.int32),
             'loss_mask': jax.ShapeDtypeStruct((cfg.data.batch_size, w), jnp.float32),
             'num_valid_segments': jax.ShapeDtypeStruct((cfg.data.batch_size,), jnp.int32)}
    new_state, metrics = jax.eval_shape(ts.make_train_step(cfg, tx), abstract, batch)
  assert metrics['loss'].shape == () and new_state.params['adapter']['memory'].shape == (1, 4096)


@pytest.mark.parametrize('changes,needle', [
    ({'data.mode': 'packed'}, 'data.mode=windows'),
    ({'ccf.ratios': (4, 8)}, 'num_memory=32'),
    ({'ccf.ratios': (3, 8)}, 'must divide'),
    ({'ccf.num_segments': 300}, 'memory_window=248'),
    ({'ccf.memory_positions': 'segment', 'ccf.num_segments': 40}, 'memory_window=31'),
    ({'ccf.mode': 'lora'}, "ccf.mode='lora'"),
    ({'ccf.ae_mode': 'alternate', 'ccf.ae_weight': 2.0}, 'ae_weight'),
    ({'ccf.memory_init_token': 5000}, 'memory_init_token'),
    ({'data.task': 'pass'}, "data.task='pass'"),
    ({'data.task': 'passkey', 'data.passkey_min_segments': 1}, 'passkey_min_segments in'),
    ({'data.task': 'passkey', 'data.passkey_ae_key': True, 'ccf.ae_mode': 'off'}, 'ae_mode=extra'),
    ({'data.passkey_ae_key': True}, "data.task='passkey'"),
    ({'data.passkey_depth': 'middle'}, "choose 'segment0' or 'uniform'"),
    ({'data.passkey_filler': 'books'}, "choose 'sentences' or 'corpus'"),
    ({'ccf.mode': 'adapter', 'ccf.encoder_trains_base': False}, 'encoder_trains_base=True'),
    ({'ccf.shared_weights': False, 'ccf.encoder_trains_base': False}, 'shared_weights=True'),
    ({'ccf.memory_gate_init': 0.5}, 'memory_gate=tanh'),
])
def test_clear_ccf_config_errors(changes, needle):
  cfg = tiny_ccf.get_config()
  for field, value in changes.items():
    section, key = field.split('.')
    cfg[section][key] = value
  with pytest.raises(config_lib.ConfigError, match=needle):
    config_lib.validate(cfg)


def test_memory_window_lifts_the_position_limit():
  cfg = tiny_ccf.get_config()
  cfg.ccf.num_segments = 300
  cfg.ccf.memory_window = 248  # (4096 - 128) / 16 segments of memory fit.
  config_lib.validate(cfg)
