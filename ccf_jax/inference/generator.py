"""Text generation from an export: `Generator` (notebooks) and `python -m ccf_jax.generate` (CLI).

    python -m ccf_jax.generate --checkpoint=EXPORT --prompt_file=prompt.txt [--max_new_tokens=128]
        [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0] [--stop='\\n'] [--memory_window=W]
        [--nomemory] [--ratio=R] [--chat] [--output=out.jsonl]

A `.jsonl` prompt file holds one prompt per line (a JSON string or an object with a "prompt"
field) generated as one batch of different lengths; any other file is one prompt. From Python:

    from ccf_jax.inference.generator import Generator
    gen = Generator.from_export('runs/local/tiny_ccf/export')
    [c.text for c in gen.generate(['To be, or not', 'ROMEO:'], max_new_tokens=64)]

Text is encoded exactly as the model saw it in training: `[bos] + ids` for windowed (CCF) data,
where every document starts with bos, plain ids for packed data. Generation stops at eos by default
(`stop` adds single-token stops such as '\\n'). The tokenizer is the export's, sentencepiece or a
Hugging Face tokenizer.json alike (`ccf_jax.data.load_tokenizer`). `chat=True` wraps each prompt
as one user message in the `chat_template` of the export's tokenizer_config.json (rendered with
jinja2, as transformers does) so that instruction-tuned models see the format they were tuned on.
All the work is
`ccf_jax.inference.engine.Engine`'s; this module only adds the tokenizer and prompt files (the
command line is `ccf_jax/generate.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import ml_collections

from ccf_jax.inference.checks import InferenceError
from ccf_jax.inference.engine import Engine
from ccf_jax.checkpoint import export as export_lib
from ccf_jax.data.tokenizer import check_vocab, load_tokenizer
from ccf_jax.data import hf_tokenizer


@dataclasses.dataclass
class Completion:
  prompt: str
  text: str
  tokens: list
  finish_reason: str  # 'stop' | 'length'.


class Generator:
  """An inference Engine plus the tokenizer of the export it was loaded from."""

  def __init__(self, engine: Engine, tokenizer, add_bos: bool):
    self.engine, self.tokenizer, self.add_bos = engine, tokenizer, add_bos
    self.last_stats: dict = {}

  @classmethod
  def from_export(cls, path: str, mesh_sizes=None, **engine_options) -> 'Generator':
    """Loads params, config and tokenizer of an export (`python -m ccf_jax.export`), on one
    device or, with `mesh_sizes` (data, fsdp, tensor), sharded over every device with the
    training rules. Options go to `Engine`: memory (False: each segment alone), memory_window,
    ratio, max_position, prefill_chunk, prefill_segments."""
    mesh = None
    if mesh_sizes is None:
      params, config_dict, tok_path = export_lib.load_export(path)
    else:
      params, config_dict, tok_path, mesh = export_lib.load_export_sharded(path, mesh_sizes)
    if tok_path is None:
      raise InferenceError(f'{path} has no tokenizer (tokenizer.model or hf/tokenizer.json), so '
                           f'text cannot be encoded. Fix: re-export with '
                           f'{export_lib.export_cmd(path)} --overwrite --tokenizer=PATH (the '
                           'tokenizer.model or tokenizer.json the run trained with).')
    config = ml_collections.ConfigDict(config_dict)
    tokenizer = load_tokenizer(tok_path)
    check_vocab(tokenizer, config.model.vocab_size, f'the tokenizer of export {path}', exact=False)
    if tokenizer.chat_template is None:  # An HF import keeps tokenizer_config.json under hf/.
      tokenizer.chat_template = hf_tokenizer.chat_template_of(hf_tokenizer.read_config(
          os.path.join(path, 'hf', hf_tokenizer.CONFIG_FILE)))
    add_bos = config.data.mode == 'windows' and tokenizer.bos_id >= 0
    return cls(Engine(config, params, mesh=mesh, **engine_options), tokenizer, add_bos)

  def encode(self, text: str, chat: bool = False) -> list:
    """Token ids of a prompt: `[bos] + ids` for windowed models, or with `chat` the prompt as one
    user message in the tokenizer's chat template (which writes its own special tokens)."""
    if chat:
      return self.tokenizer.encode_with_specials(self.chat_text(text))
    return ([self.tokenizer.bos_id] if self.add_bos else []) + list(self.tokenizer.encode(text))

  def chat_text(self, text: str) -> str:
    """`text` as a user message rendered by the chat template, ending with the assistant's turn."""
    tpl = self.tokenizer.chat_template
    if tpl is None:
      raise InferenceError('the export has no chat template (tokenizer_config.json\'s '
                           '"chat_template"), so --chat cannot format prompts. Fix: drop --chat, '
                           'or use an export of a chat model.')
    try:
      import jinja2
      import jinja2.sandbox
    except ImportError:
      raise InferenceError('chat templates are rendered with jinja2, which is not installed. '
                           'Fix: pip install jinja2 (or drop --chat).') from None
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
      raise InferenceError(f'the chat template refused the prompt: {message}')

    env.globals['raise_exception'] = raise_exception
    text_of = {i: t for t, i in self.tokenizer.special_tokens().items()}
    return env.from_string(tpl).render(
        messages=[{'role': 'user', 'content': text}], add_generation_prompt=True,
        bos_token=text_of.get(self.tokenizer.bos_id, ''),
        eos_token=text_of.get(self.tokenizer.eos_id, ''))

  def stop_ids(self, stop: Sequence | None) -> list:
    """Token ids of stops (ids or single-token strings); eos is always one."""
    ids = [self.tokenizer.eos_id]
    for s in stop or ():
      if isinstance(s, str):
        enc = self.tokenizer.encode(s)
        if len(enc) != 1:
          raise InferenceError(f'stop string {s!r} is {len(enc)} tokens ({enc}); only '
                               'single-token stops are supported. Fix: pass its token id or a '
                               'shorter string.')
        s = enc[0]
      ids.append(int(s))
    return ids

  def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, *,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               stop: Sequence | None = None, seed: int = 0, chat: bool = False) -> list:
    """Completions of one prompt or a batch of prompts (any lengths), as `Completion`s; `chat`
    formats each prompt with the chat template (`encode`). Timing, cache size and compilation
    counts of the call are in `self.last_stats`."""
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    for i, t in enumerate(texts):
      if not isinstance(t, str) or not t:
        raise InferenceError(f'prompt {i} is empty or not a string ({t!r}). Fix: give text; '
                             'for unconditional generation use Engine.generate([[bos_id]]).')
    out = self.engine.generate([self.encode(t, chat) for t in texts], max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               stop_tokens=self.stop_ids(stop), seed=seed)
    self.last_stats = out.stats
    done = [Completion(p, self.tokenizer.decode(ids), ids, r)
            for p, ids, r in zip(texts, out.tokens, out.finish_reason)]
    return done[0] if single else done


def read_prompts(path: str) -> list:
  """Prompts of a file: one per line of a .jsonl (string or {"prompt": ...}), else the file."""
  if not os.path.isfile(path):
    raise InferenceError(f'--prompt_file={path!r} does not exist.')
  with open(path, encoding='utf-8') as f:
    text = f.read()
  if not path.endswith('.jsonl'):
    return [text]
  prompts = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      item = json.loads(line)
    except ValueError as e:
      raise InferenceError(f'{path}:{n} is not JSON ({e}).') from None
    prompts.append(item['prompt'] if isinstance(item, dict) and 'prompt' in item else item)
  return prompts
