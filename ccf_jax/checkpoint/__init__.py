"""Orbax checkpoints for ccf_jax (this package; `export.py` is the params-only export format): atomic async saves, exact resume, fallback on corruption.

Layout: `workdir/checkpoints/<step>/` holds four Orbax items:

  state/     the train state (any pytree of arrays), written by `StandardSave`. Restored with the
             caller's target shardings, which is how a run saved on one mesh resumes on another.
  data/      the grain iterator state (grain's own Orbax handler: one JSON file per process).
  config/    the experiment config as JSON (what the run was trained with, for export/inspection).
  metadata/  JSON: step, tokens seen, save time, library versions, the caller's `extra` dict and a
             per-array fingerprint of the state (see below).

Why each piece exists:
  * Atomicity comes from Orbax: a step is written into `<step>.orbax-checkpoint-tmp-<t>` and renamed
    to `<step>` only after every item is on disk. A process killed mid-save leaves only the tmp
    directory, which Orbax never lists as a step; we log it and let Orbax delete it at startup.
  * Orbax does not checksum array data: a flipped byte in a chunk file restores silently with a
    wrong value (checked on orbax-checkpoint 0.12.8). So every save records a 32-bit positional
    checksum per array (computed on device, exact for any sharding) and every restore verifies it.
  * A latest checkpoint that cannot be read (truncated/missing files, missing items, bad JSON, or a
    checksum mismatch) is renamed to `<step>.corrupt` (kept for inspection, and out of the way of
    the next save of that step) with a WARNING naming it, and the previous step is tried.
  * A checkpoint that reads fine but does not fit the target (different parameter names or shapes:
    a config change) is NOT corruption; falling back would silently restart training. It raises
    `CheckpointMismatchError` instead.
  * The grain iterator state is captured synchronously inside `save` (grain's handler is a sync
    handler run in Orbax's blocking phase), so an async save is safe to overlap with further
    `next(data_iter)` calls; arrays are copied to host before `save` returns, so donated buffers are
    fine too.
"""

# The package's public interface (callers import `ccf_jax.checkpoint`, not its modules).
from ccf_jax.checkpoint.integrity import (CHECKPOINTS_SUBDIR, CONFIG, CORRUPT_SUFFIX, METADATA,
                                          STATE, CheckpointError, CheckpointMismatchError,
                                          CorruptCheckpointError, abspath, check_compatible,
                                          fingerprint, quiet_failed_reads, saved_arrays,
                                          short_error, tree_metadata, verify_fingerprint)
from ccf_jax.checkpoint.manager import CheckpointManager
from ccf_jax.checkpoint.restore import (RestoreInfo, is_step_dir, read_json_item, resolve_step_dirs,
                                        restore_from, restore_params)
