"""What every evaluation section shares: the loaded export, held-out documents, position limits,
"n/a" cells, host memory and progress lines.

Why a module of its own: the sections (`ppl`, `passkey`, `autoencode`, `efficiency`)
must measure CCF and its baselines the same way, so the decisions that make them comparable live
here once:
  * `EvalModel` is an export ready to run on one device or sharded on a mesh (`load`'s
    `mesh_sizes`), whatever its architecture. A plain
    `decoder` export (packed training) is evaluated as `full_attention` (the same computation: one
    causal pass over raw tokens), with its trained range being `data.seq_len`.
  * `range_status` decides, for a context of n segments, whether a cell is computed, computed but
    labelled as beyond the trained positions, or n/a (with the reason): CCF needs
    `config_lib.max_relative_position` <= model.max_position; full attention is only scored within the
    positions it was trained on; segment_local never sees more than one segment.
  * Held-out documents are tokenised as the data pipeline streams them in windows mode:
    `[bos] + ids + [eos]`, with the export's own tokenizer (token-level numbers are tied to it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
from ccf_jax import data as data_lib
from ccf_jax.checkpoint import export as export_lib
from ccf_jax.core import config_lib

NA = 'na'  # Key of an n/a cell: {'na': 'reason'}.
# XLA compiler options of every evaluation program (None = XLA's defaults). Evaluation compiles
# many small programs once each, so on CPU compile time can dominate; tests set a fast-compile
# level here (the numbers do not change, only how hard XLA optimises).
COMPILER_OPTIONS = None


def jit(fn, **kwargs):
  """jax.jit with the evaluation's compiler options."""
  import jax
  return jax.jit(fn, compiler_options=COMPILER_OPTIONS, **kwargs)


def na(reason: str) -> dict:
  return {NA: reason}


def is_na(cell) -> bool:
  return isinstance(cell, dict) and NA in cell


@dataclasses.dataclass
class EvalModel:
  """An export on the default device or a mesh: config (arch normalised), params, tokenizer,
  metadata."""
  export_dir: str
  config: object  # ConfigDict (unlocked); model.arch: ccf | segment_local | full_attention.
  params: dict
  tokenizer: object  # ccf_jax.data.TokenizerBase (sentencepiece or tokenizer.json).
  info: dict  # export_info.json (step, source, versions).
  exported_arch: str  # model.arch as trained ('decoder' becomes 'full_attention' above).
  mesh: object = None  # The jax Mesh the params are sharded over (None: one device).

  @property
  def arch(self) -> str:
    return self.config.model.arch

  @property
  def segment_len(self) -> int:
    return int(self.config.ccf.segment_len)

  @property
  def ratios(self) -> tuple:
    """Compression ratios the checkpoint supports (CCF), else ()."""
    if self.arch != 'ccf':
      return ()
    x = self.config.ccf
    return tuple(int(r) for r in x.ratios) or (x.segment_len // x.num_memory,)

  @property
  def trained_tokens(self) -> int:
    """Tokens per training example: the context the model saw in training."""
    if self.exported_arch == 'decoder':
      return int(self.config.data.seq_len)
    return int(config_lib.window_len(self.config))

  @property
  def label(self) -> str:
    if self.arch == 'ccf':
      return f"ccf {'/'.join(f'{r}x' for r in self.ratios)}"
    return self.exported_arch


def with_schema_defaults(config_dict: dict):
  """The export's config over the current schema (experiments/base.py): fields added to the code
  after the export was made take their defaults, so older exports keep loading."""
  import ml_collections

  from experiments import base

  def merge(into, src):
    for k, v in src.items():
      if isinstance(v, dict) and isinstance(into.get(k), ml_collections.ConfigDict):
        merge(into[k], v)
      else:
        into[k] = v

  config = base.get_config()
  config.unlock()
  merge(config, config_dict)
  return config


def load(export_dir: str, corpus: str | None = None, mesh_sizes=None) -> EvalModel:
  """Loads an export for evaluation; `corpus` replaces data.corpus (held-out text). On one device,
  or with `mesh_sizes` (data, fsdp, tensor) sharded over every device with the training rules
  (`export.load_export_sharded`): the jitted scorers then run sharded by propagation."""
  import jax

  mesh = None
  if mesh_sizes is None:
    params, config_dict, tok_path = export_lib.load_export(export_dir)
  else:
    params, config_dict, tok_path, mesh = export_lib.load_export_sharded(export_dir, mesh_sizes)
  if tok_path is None:
    raise export_lib.ExportError(f'{export_dir} has no tokenizer (tokenizer.model or '
                                 'hf/tokenizer.json); evaluation needs the one the model was '
                                 f'trained with. Fix: {export_lib.export_cmd(export_dir)} '
                                 '--overwrite --tokenizer=PATH (its tokenizer.model or '
                                 'tokenizer.json).')
  config = with_schema_defaults(config_dict)
  config.data.tokenizer = tok_path
  if corpus:
    config.data.corpus, config.data.mixture = corpus, ''
  if mesh is None:
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.num_devices = 1, 1, 1, 1
  config.mesh.distributed = False
  exported_arch = config.model.arch
  if exported_arch == 'decoder':  # One causal pass over raw tokens: what full_attention computes.
    config.model.arch = 'full_attention'
  with open(os.path.join(export_dir, export_lib.INFO_JSON)) as f:
    info = json.load(f)
  tok = data_lib.load_tokenizer(tok_path, config.model.vocab_size)
  if mesh is None:
    params = jax.device_put(params)
  return EvalModel(os.path.abspath(export_dir), config, params, tok, info, exported_arch, mesh)


def range_status(model: EvalModel, num_segments: int) -> tuple[str, str]:
  """('ok' | 'beyond' | 'na', note) for a context of `num_segments` segments of this model."""
  cfg, l = model.config, model.segment_len
  if model.arch == 'ccf':
    need = config_lib.max_relative_position(cfg.ccf, num_segments)
    if need > cfg.model.max_position:
      return 'na', (f'needs rotary positions up to {need} > model.max_position='
                    f'{cfg.model.max_position} (memory_window={cfg.ccf.memory_window})')
    if num_segments > cfg.ccf.num_segments:
      return 'beyond', f'beyond the {cfg.ccf.num_segments} segments of a training window'
    return 'ok', ''
  if model.arch == 'full_attention':
    if num_segments * l > model.trained_tokens:
      return 'na', f'beyond the {model.trained_tokens} trained positions of full attention'
    return 'ok', ''
  return 'ok', ''  # segment_local: every segment alone, at base positions.


def available_bytes() -> int:
  """Host memory available now (MemAvailable), for "does it fit here" decisions."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return int(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES'))


def documents(model: EvalModel, split: str, max_docs: int, min_tokens: int = 0) -> list:
  """Up to `max_docs` held-out documents as int32 arrays `[bos] + ids + [eos]` of at least
  `min_tokens` tokens, in corpus order (deterministic)."""
  tok = model.tokenizer
  out = []
  for text in data_lib.load_documents(model.config, split):
    ids = tok.encode(text)
    doc = ([tok.bos_id] if tok.bos_id >= 0 else []) + list(ids) + [tok.eos_id]
    if len(doc) >= max(min_tokens, 2):
      out.append(np.asarray(doc, np.int32))
    if len(out) >= max_docs:
      break
  if not out:
    raise data_lib.DataError(f'no {split} document of {model.config.data.corpus!r} has at least '
                             f'{min_tokens} tokens. Fix: --corpus=PATH with longer documents, or '
                             'a smaller preset.')
  return out


def ppl(loss: float) -> float:
  return math.exp(min(loss, 50.0))


def stderr(values) -> float:
  v = np.asarray(values, np.float64)
  return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float('nan')


class Progress:
  """One progress line per evaluation loop (`[eval ppl] 3/9 K=512 12s, ETA 25s`), redrawn in place
  on a terminal and printed every ~10% otherwise (logs stay readable)."""

  def __init__(self, name: str, total: int, stream=None):
    self.name, self.total, self.done = name, max(int(total), 1), 0
    self.stream = stream or sys.stdout
    self.t0 = time.time()
    self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
    self._last_decile = -1

  def update(self, note: str = '', n: int = 1):
    self.done += n
    dt = time.time() - self.t0
    eta = dt / self.done * (self.total - self.done)
    width = 20
    bar = '#' * int(width * self.done / self.total)
    line = (f'[eval {self.name}] |{bar:<{width}}| {self.done}/{self.total} {note} '
            f'{dt:.0f}s, ETA {eta:.0f}s')
    decile = int(10 * self.done / self.total)
    if self.tty:
      self.stream.write('\r' + line + ('\n' if self.done >= self.total else ''))
    elif decile != self._last_decile or self.done >= self.total:
      self.stream.write(line + '\n')
    self._last_decile = decile
    self.stream.flush()
