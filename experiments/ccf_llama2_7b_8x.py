"""CCF adapter over Llama-2-7B at 8x, the paper's setting, for a 256-chip pod (no edits needed).

Model: Llama-2-7B shapes (32 layers, d=4096, 32 heads, MLP 11008, vocab 32000, 4K positions),
initialised from a Hugging Face checkpoint (`init.from_hf`, mapped into both encoder and decoder),
frozen; trained: encoder LoRA on q/v and the memory rows' k/v LoRA (rank 128, alpha 512) plus the
memory vector, about 2% of the parameters.
Windows: T=128 segments of l=1024 tokens (131,072 tokens per document window), c=128 memory tokens
per segment (8x). Llama-2's 4,096 positions hold 24 segments of memory (24 * 128 rows) plus one raw
segment, so `memory_window=24`: each segment reads the memory of the 24 before it, which keeps every
rotary distance inside what the base was trained on (the paper's cap: 25,600 tokens at 8x).
Mesh (256 chips): data=8 carries the batch (8 documents, 1M tokens per step), fsdp=32 carries the
segments (4 per chip) and shards the frozen base; tensor=1.
Optimiser (the released recipe): AdamW lr 1e-4, betas (0.9, 0.95), wd 0.1, clip 1.0, 1% linear
warmup, cosine to 0, 10,000 steps.
"""

from experiments import base


def get_config():
  c = base.get_config()
  c.name = 'ccf_llama2_7b_8x'
  m = c.model
  m.arch = 'ccf'
  m.vocab_size = 32000
  m.d_model = 4096
  m.num_layers = 32
  m.num_heads = 32
  m.num_kv_heads = 32
  m.head_dim = 128
  m.mlp_dim = 11008
  m.rope_theta = 10000.0
  m.max_position = 4096
  m.norm_eps = 1e-5
  m.tie_embeddings = False
  m.param_dtype = 'bfloat16'  # The frozen base; adapter params are always float32.
  m.dtype = 'bfloat16'
  m.remat_policy = 'full'

  d = c.data
  d.mode = 'windows'
  d.corpus = 'data/long_books'  # Long documents (paper: RedPajama books + Activation Beacon mix).
  d.tokenizer = 'checkpoints/Llama-2-7b-chat-hf/tokenizer.model'
  d.batch_size = 8  # Global: 8 documents x 131,072 tokens.
  d.num_workers = 4

  x = c.ccf
  x.segment_len = 1024
  x.num_segments = 128
  x.num_memory = 128  # 8x.
  x.mode = 'adapter'
  x.lora_rank = 128
  x.lora_alpha = 512.0
  x.distinct_memory_tokens = False  # One vector repeated c times, as the released code.
  x.memory_init_token = 2  # Llama-2's </s>.
  x.memory_positions = 'sequential'
  x.memory_window = 24  # (4096 - 1024) / 128: the memory that fits Llama-2's 4K positions.
  x.ae_mode = 'off'
  # Training-efficient path (ccf_jax/ccf/incremental.py): the released recipe's reservoir of S=2
  # encoder graphs ('final': encoder backward over 2 segments, not 128), the decoder streamed in
  # 4 chunks of 32 segments (one per fsdp shard per step, each chunk reading only the 24 + 32
  # segments' memory rows it can see), each chunk step rematerialised.
  x.grad_mode = 'reservoir'
  x.reservoir_size = 2
  x.reservoir_semantics = 'final'
  x.decoder_segment_chunk = 32
  x.decoder_remat = 'full'
  x.encoder_map_batch = 32  # The no-residual encoder pass over all 128 segments, 32 at a time.

  t = c.train
  t.steps = 10000
  t.lr = 1e-4
  t.warmup_steps = 100  # 1%.
  t.decay = 'cosine'
  t.end_lr_frac = 0.0
  t.b1, t.b2 = 0.9, 0.95
  t.weight_decay = 0.1
  t.clip_norm = 1.0
  t.log_every = 10
  t.eval_every = 1000
  t.eval_batches = 10
  c.checkpoint.every = 500
  c.init.from_hf = 'checkpoints/Llama-2-7b-chat-hf'

  s = c.mesh
  s.data, s.fsdp, s.tensor = 8, 32, 1
  s.distributed = True
  # base.py's rule table with documents over data and each document's segments over fsdp.
  s.rules = tuple(dict(s.rules, batch=('data',), segment=('fsdp',)).items())
  return c
