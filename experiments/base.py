"""The full config schema of ccf_jax, with one comment per field.

Every experiment imports `get_config()` from here and overrides a few fields, so an unknown field
in a variant or on the command line (`--config.a.b=V`) is an error rather than a silent no-op.
Validation and derived fields live in `ccf_jax/config_lib.py`, not here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'base'  # Human-readable experiment name (logged, exported).

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.arch = 'decoder'  # 'decoder' (plain LM) | 'ccf' | 'segment_local' | 'full_attention'.
  m.vocab_size = 2048  # Must equal the tokenizer's vocabulary size (checked at startup).
  m.d_model = 128  # Residual width d.
  m.num_layers = 4  # Transformer blocks (stacked and scanned).
  m.num_heads = 4  # Query heads.
  m.num_kv_heads = 2  # Key/value heads (grouped-query attention); divides num_heads.
  m.head_dim = 32  # Per-head width; usually d_model // num_heads.
  m.mlp_dim = 512  # SwiGLU hidden width.
  m.rope_theta = 10000.0  # Rotary base.
  m.rope_scaling = ml_collections.ConfigDict()  # Rope scaling; empty = none. rope_type: llama3
  # (the default) | linear | yarn, with transformers' keys (factor, original_max_position_embeddings).
  m.sliding_window = 0  # Keys each query sees (Mistral's sliding_window); 0 = all. Decoder only.
  m.qkv_bias = False  # Biases on the q/k/v projections (Qwen2).
  m.max_position = 4096  # Largest rotary position the model is built/trained for.
  m.norm_eps = 1e-5  # RMSNorm epsilon.
  m.tie_embeddings = False  # Share the input embedding with the LM head.
  m.init_std = 0.02  # Std of the normal initialiser for weights.
  # Mixed precision is param_dtype=float32 + dtype=bfloat16: float32 master weights and AdamW
  # moments, bfloat16 matmuls; norms, softmax, logits and loss float32 whatever dtype says.
  m.param_dtype = 'float32'  # Stored parameters: float32 | bfloat16 (a frozen base: ccf.mode=
  # adapter, whose adapter is float32 always; a trained one needs train.bf16_master_weights).
  m.dtype = 'float32'  # Compute dtype of activations and matmuls: float32 | bfloat16.
  m.remat_policy = 'none'  # Per-layer rematerialisation: none | full | dots | dots_no_batch.
  m.scan_layers = True  # Scan over stacked layers (flat compile time); False unrolls (FLOP checks).
  m.attention_impl = 'auto'  # Every attention's kernel: auto | xla | blocked | rows | cudnn | splash
  # (model/attention.py; auto: cpu -> rows, blocked or xla by mask and size, gpu -> cudnn for
  # bf16, tpu -> splash).
  m.attention_block = 128  # Query/key rows per block of the blocked, rows and splash kernels.
  m.loss_chunk = 0  # Plain decoder: head + cross-entropy fused over chunks of this many positions
  # (model/head_loss.py: no whole [B, L, vocab] logits; the batch on one device); 0 = whole logits.

  # ---------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  d.corpus = 'shakespeare'  # Built-in corpus name, or a path (dir of .txt, .jsonl, .array_record).
  d.mixture = ''  # Optional weighted mixture 'path_or_name:weight,...'; overrides corpus if set.
  d.text_field = 'text'  # JSONL field holding the document text.
  d.replace_invalid_utf8 = False  # Replace bad bytes instead of failing on non-UTF-8 input.
  # A sentencepiece .model or Hugging Face tokenizer.json; '' = the tokenizer of init.params_only /
  # init.from_hf when set, else one trained on the corpus (cached).
  d.tokenizer = ''
  d.tokenizer_type = 'bpe'  # When training a tokenizer: bpe | unigram.
  d.mode = 'packed'  # 'packed': short packed sequences (plain decoder); 'windows': whole-document windows (CCF).
  d.seq_len = 256  # Tokens per example (packed mode); windows use num_segments * segment_len.
  d.stride = 0  # Window stride in tokens (windows mode); 0 = non-overlapping.
  d.cross_documents = False  # Allow windows to cross document boundaries.
  d.batch_size = 8  # Global batch size (examples per optimizer step, across all processes).
  d.shuffle_seed = 0  # Seed of the data order (independent of the model seed).
  d.num_workers = 0  # grain worker processes (0 = in-process).
  d.prefetch = 2  # Batches prefetched ahead of the train step.
  d.task = ''  # '' = the corpus text | 'passkey': synthetic passkey windows (tasks/passkey.py).
  d.passkey_min_segments = 0  # Passkey curriculum: windows start this many segments long (0 = T) ...
  d.passkey_curriculum_steps = 0  # ... and reach T segments after this many steps (0 = always T).
  d.passkey_score = 'answer'  # Passkey training targets: 'answer' (the key) | 'all' (every token).
  d.passkey_ae_key = False  # Passkey training: auto-encode the key's segment, targets its digits.
  d.passkey_depth = 'segment0'  # Key statement: 'segment0' (inside segment 0) | 'uniform' (any depth).
  d.passkey_filler = 'sentences'  # Around the key: 'sentences' (repeated) | 'corpus' (the split's text).

  # ---------------------------------------------------------------- ccf (used when model.arch != 'decoder')
  x = c.ccf = ml_collections.ConfigDict()
  x.segment_len = 128  # l: tokens per segment.
  x.num_segments = 8  # T: segments per training window.
  x.num_memory = 16  # c: memory tokens per segment (ratio r = l / c).
  x.ratios = ()  # Ratios sampled per window, e.g. (4, 8, 16, 32), c = l/min padded; () = l/c.
  x.mode = 'pretrain'  # 'pretrain': all trains | 'adapter': frozen base; LoRA + memory train.
  x.shared_weights = True  # Pretrain: encoder shares the decoder's weights (False = own copy).
  x.encoder_trains_base = True  # Pretrain, shared: the encoder's gradient reaches the shared
  # weights (paper); False = only memory vectors and LoRAs learn to compress, the base as an LM.
  x.lora_rank = 8  # LoRA rank on encoder q/v and memory-row k/v (transfer head); paper 128.
  x.lora_alpha = 32.0  # LoRA scale numerator (delta = alpha / rank * x A B); paper 512.
  x.distinct_memory_tokens = False  # One vector per memory slot, not one repeated c times.
  x.memory_init_token = -1  # Memory vectors start as this token's embedding (paper: eos); -1 random.
  x.mask = 'nested'  # Encoder: 'nested' (memory j sees tokens < (j+1)*l/c) | 'plain' (all).
  x.memory_positions = 'sequential'  # Memory rows' rotary positions: 'sequential' | 'segment'.
  x.memory_gate = 'none'  # Decoder's memory read: 'none' one softmax over [memory; raw] (paper) |
  # 'tanh': memory rows get their own softmax, added with a per-head weight tanh(g) ...
  x.memory_gate_init = 0.0  # ... g's initial value (0: the decoder starts as segment_local).
  x.memory_window = 0  # Attend to the M most recent segments' memory (bounds positions); 0 = all.
  x.score_first_token = True  # Score each segment's first token (predicted by the previous one).
  x.ae_mode = 'off'  # Auto-encoding: 'off' | 'extra' (one random segment per window) | 'alternate'.
  x.ae_weight = 0.5  # 'extra': auto-encoding loss weight; 'alternate': fraction of AE steps.
  # Training-efficient optimisation (ccf_jax/ccf/incremental.py; indices 0-based).
  x.grad_mode = 'full'  # Encoder gradient: 'full' BPTT | 'truncated' (losses s+1..s+S) | 'reservoir'.
  x.reservoir_size = 2  # S: reservoir slots (reservoir) or losses per memory (truncated); paper 2.
  x.reservoir_semantics = 'final'  # 'final': final reservoir, all later losses | 'streaming': UIO.
  x.compensate = False  # Reservoir: scale sampled gradients by 1/inclusion prob. (unbiased).
  x.decoder_segment_chunk = 0  # k: decoder segments per scan step (1 serial .. T parallel); 0 = T.
  x.encoder_remat = 'model'  # Encoder layers' remat policy; 'model' = model.remat_policy.
  x.decoder_remat = 'none'  # Remat policy of each decoder chunk step (of its layers when k = T).
  x.unrolled = False  # Debug: decoder chunks in a Python loop instead of lax.scan (same results).
  x.encoder_map_batch = 0  # Segments per lax.map step of the no-residual encoder pass; 0 = all at once.

  # ---------------------------------------------------------------- optimisation / loop
  t = c.train = ml_collections.ConfigDict()
  t.seed = 0  # Model init and dropout seed.
  t.steps = 1000  # Total optimizer steps (the schedule's horizon).
  t.time_budget_s = 0.0  # Stop training after this many seconds (0 = no limit); a checkpoint is saved.
  t.lr = 3e-3  # Peak learning rate.
  t.adapter_lr_mult = 1.0  # CCF parameters' (memory, gate, LoRAs) lr = lr x this (train/optim.py).
  t.warmup_steps = 50  # Linear warmup steps.
  t.decay = 'cosine'  # Decay after warmup: cosine | linear | constant.
  t.end_lr_frac = 0.1  # Final lr as a fraction of the peak.
  t.b1 = 0.9  # AdamW beta1.
  t.b2 = 0.95  # AdamW beta2.
  t.eps = 1e-8  # AdamW epsilon.
  t.weight_decay = 0.1  # Decoupled weight decay (norms, biases and scalars are excluded).
  t.clip_norm = 1.0  # Global-norm gradient clipping (0 = off).
  t.grad_accum = 1  # Micro-batches per step; the loss is normalised by the total token count.
  t.bf16_master_weights = False  # Allow model.param_dtype=bfloat16 for trained weights: bfloat16
  # masters and AdamW moments (half the state; updates below 2^-8 of a weight are lost).
  # On a non-finite loss, gradient or update, or one over max_update_ratio: 'stop' with an error
  # (exit code 3; the bad state is never saved) or 'skip' the update (counted) and go on.
  t.nonfinite = 'stop'
  t.max_update_ratio = 1.0  # Reject an update whose norm exceeds this times the params' norm (0 = off).
  t.divergence_factor = 3.0  # Stop (exit 3) when a loss exceeds this times max(best smoothed loss, 1) (0 = off).
  t.log_every = 10  # Metrics cadence in steps.
  # Dense bf16 peak FLOP/s of one device, for MFU; 0 = from the device kind's entry in
  # core/flops.PEAK_BF16_FLOPS (a kind not listed, e.g. a CPU, gets no MFU).
  t.peak_flops_per_device = 0.0
  t.eval_every = 0  # Evaluation cadence in steps (0 = only at the end).
  t.eval_batches = 4  # Batches per evaluation.
  t.profile_start = -1  # First step of a jax.profiler trace (-1 = off).
  t.profile_steps = 3  # Steps traced.

  # ---------------------------------------------------------------- checkpoints
  k = c.checkpoint = ml_collections.ConfigDict()
  k.every = 200  # Save every N steps (and at the end, on SIGTERM and at the time budget).
  k.keep_last = 3  # Keep the N most recent checkpoints.
  k.keep_every = 0  # Also keep every K-th step forever (0 = off).
  k.async_save = True  # Write checkpoints in the background.

  # ---------------------------------------------------------------- initialisation
  # Priority: resume from workdir > init.from_checkpoint > init.params_only | init.from_hf > fresh
  # (params_only and from_hf exclude each other). Starting from either, the run uses its tokenizer.
  i = c.init = ml_collections.ConfigDict()
  i.from_checkpoint = ''  # A checkpoint step directory or workdir: full state (params, optimizer, data).
  i.params_only = ''  # An export directory: parameters only; optimizer and step start fresh.
  i.from_hf = ''  # A Hugging Face Llama-family directory (config.json + safetensors).

  # ---------------------------------------------------------------- mesh / sharding
  s = c.mesh = ml_collections.ConfigDict()
  s.data = -1  # Data-parallel axis size (-1 = whatever is left of num_devices).
  s.fsdp = 1  # Fully-sharded data-parallel axis size (params sharded on 'embed').
  s.tensor = 1  # Tensor-parallel axis size (heads, mlp, vocab).
  s.num_devices = 0  # Devices to use (0 = all).
  s.distributed = False  # Call jax.distributed.initialize() (multi-host launchers set this).
  # Logical axis -> mesh axes. One table for params and activations; a mesh axis is used at most once
  # per array (the first logical axis claiming it wins).
  s.rules = (
      ('batch', ('data', 'fsdp')),
      ('segment', ('fsdp',)),
      ('length', None),
      ('memory', None),
      ('embed', ('fsdp',)),
      ('heads', ('tensor',)),
      ('kv_heads', ('tensor',)),
      ('head_dim', None),
      ('mlp', ('tensor',)),
      ('vocab', ('tensor',)),
      ('layers', None),
  )
  return c
