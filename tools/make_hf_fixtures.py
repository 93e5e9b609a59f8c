"""Builds the Hugging Face Llama fixtures in tests/fixtures/hf/ with `transformers` itself.

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors sentencepiece tokenizers
    /tmp/hfvenv/bin/python tools/make_hf_fixtures.py            # rewrites tests/fixtures/hf/

Why: the converter's parity test needs a reference that is independent of ccf_jax. Each fixture is
a small random `LlamaForCausalLM` saved by `save_pretrained` (so the file layout, tensor names and
config keys are exactly what transformers writes), plus `expected.npz`: fixed token ids and the
float32 logits transformers computes for them. CI (tests/test_convert.py) needs neither torch nor
transformers: it converts the files and compares against the stored logits.

The fixtures cover grouped-query attention (4 query heads, 2 kv heads) with tied and untied
embeddings, float32 and bfloat16 storage, a sharded checkpoint (index.json), Llama-3 rope scaling
both in transformers 5's `rope_parameters` form and in the legacy `rope_theta` + `rope_scaling`
form most hub checkpoints still carry, and both tokenizer kinds (a sentencepiece `tokenizer.model`
and a `tokenizers` `tokenizer.json`). Weights are redrawn at O(1) scale (transformers' 0.02 init
gives near-uniform logits, which would hide layout mistakes) and the total stays under ~1 MB.
bfloat16 fixtures store rounded weights; their expected logits are computed in float32 from those
rounded weights, which is what ccf_jax computes with `dtype=float32`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'tests', 'fixtures', 'hf')
VOCAB, SEED = 128, 1234
TOKENS_SHAPE = (2, 24)
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, hidden_act='silu')
# Llama-3's scaling with a short original context, so the scaled frequencies matter at 24 tokens.
LLAMA3_ROPE = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)

FIXTURES = {
    # name: (tie_word_embeddings, rope_scaling or None, rope_theta, dtype, options)
    'llama2_gqa_untied': (False, None, 10000.0, torch.float32, {'tokenizer': 'sentencepiece'}),
    'llama2_gqa_tied': (True, None, 10000.0, torch.float32, {}),
    'llama3_rope_untied_sharded': (False, LLAMA3_ROPE, 500000.0, torch.bfloat16,
                                   {'tokenizer': 'tokenizers', 'shard': '60KB'}),
    'llama3_rope_tied_legacy': (True, LLAMA3_ROPE, 500000.0, torch.bfloat16,
                                {'tokenizer': 'tokenizers', 'legacy_config': True}),
}

TEXT = """It is a truth universally acknowledged, that a single man in possession of a good
fortune, must be in want of a wife. However little known the feelings or views of such a man may
be on his first entering a neighbourhood, this truth is so well fixed in the minds of the
surrounding families, that he is considered the rightful property of some one or other of their
daughters. The quick brown fox jumps over the lazy dog; 0123456789 and back again.
"""


def randomize(model: torch.nn.Module, seed: int):
  """O(1)-scale weights: norms 1 +- 0.1, matrices N(0, 1/fan_in), embeddings N(0, 0.5)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      elif 'embed_tokens' in name or name == 'lm_head.weight':
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def legacy_config(path: str):
  """Rewrites config.json the way transformers 4.x and most hub Llama-3 checkpoints store rope."""
  with open(path) as f:
    cfg = json.load(f)
  rope = dict(cfg.pop('rope_parameters'))
  cfg['rope_theta'] = rope.pop('rope_theta')
  cfg['rope_scaling'] = rope if rope.get('rope_type', 'default') != 'default' else None
  with open(path, 'w') as f:
    json.dump(cfg, f, indent=2, sort_keys=True)


def sentencepiece_tokenizer(out_dir: str):
  """A tiny Llama-2-style sentencepiece model (unk 0, bos 1, eos 2, no pad) of VOCAB pieces."""
  import io
  import sentencepiece as spm
  model = io.BytesIO()  # In memory: no temporary path recorded in the model (reproducible bytes).
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter((TEXT * 4).splitlines()), model_writer=model, vocab_size=VOCAB,
      model_type='bpe', unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
      minloglevel=2, num_threads=1,
      normalization_rule_name='identity')  # No 240 KB NFKC table in a 128-piece model.
  with open(os.path.join(out_dir, 'tokenizer.model'), 'wb') as f:
    f.write(model.getvalue())


def tokenizers_tokenizer(out_dir: str):
  """A tiny Llama-3-style `tokenizer.json` (BPE, special tokens first) of VOCAB entries."""
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
  tok = Tokenizer(models.BPE(unk_token='<|unk|>'))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  special = ['<|unk|>', '<|begin_of_text|>', '<|end_of_text|>']
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special, show_progress=False)
  tok.train_from_iterator(TEXT.splitlines(), trainer)
  assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
  tok.save(os.path.join(out_dir, 'tokenizer.json'))
  with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump({'bos_token': '<|begin_of_text|>', 'eos_token': '<|end_of_text|>',
               'unk_token': '<|unk|>', 'tokenizer_class': 'PreTrainedTokenizerFast'}, f, indent=2)


def build(name: str, out_root: str, seed: int):
  tie, rope, theta, dtype, opts = FIXTURES[name]
  rope_parameters = dict(rope or {'rope_type': 'default'}, rope_theta=theta)
  cfg = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=tie, rope_parameters=rope_parameters,
                                 attn_implementation='eager')
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).eval()
  randomize(model, seed)
  model = model.to(dtype)  # Storage rounding (bfloat16 fixtures).
  out = os.path.join(out_root, name)
  shutil.rmtree(out, ignore_errors=True)
  kwargs = {'max_shard_size': opts['shard']} if 'shard' in opts else {}
  model.save_pretrained(out, **kwargs)
  if opts.get('legacy_config'):
    legacy_config(os.path.join(out, 'config.json'))
  if opts.get('tokenizer') == 'sentencepiece':
    sentencepiece_tokenizer(out)
  elif opts.get('tokenizer') == 'tokenizers':
    tokenizers_tokenizer(out)

  # Expected logits: reload what was written (so config.json is what is tested), in float32.
  ref = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                      attn_implementation='eager').eval()
  tokens = np.random.RandomState(seed).randint(0, VOCAB, TOKENS_SHAPE).astype(np.int32)
  with torch.no_grad():
    logits = ref(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
  np.savez_compressed(os.path.join(out, 'expected.npz'), tokens=tokens, logits=logits)
  for f in os.listdir(out):  # save_pretrained writes 0600 files; fixtures are plain repo files.
    os.chmod(os.path.join(out, f), 0o644)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  print(f'{name}: {sorted(os.listdir(out))} {size / 1024:.0f} KiB, logits std '
        f'{logits.std():.2f}', flush=True)
  return size


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=OUT, help='Fixture root (default: tests/fixtures/hf).')
  parser.add_argument('--only', nargs='*', default=sorted(FIXTURES), help='Fixture names.')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  total = sum(build(name, args.out, SEED + i) for i, name in enumerate(sorted(FIXTURES))
              if name in args.only)
  print(f'total {total / 1024:.0f} KiB (torch {torch.__version__}, transformers '
        f'{transformers.__version__})')


if __name__ == '__main__':
  main()
