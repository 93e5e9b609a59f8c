# Sourced by launch/local.sh, launch/local_suite.sh and the recipes: train the model a config
# starts from.
#
# tiny_ccf.py and its variants start from a pretrained plain decoder, as CCF starts from Llama-2 in
# the paper: their init.params_only is runs/local/tiny/export, the export of experiments/tiny.py.
# Staged recipes chain the same way (passkey_4k.py starts from runs/passkey_512/export, the export
# of experiments/passkey_512.py, which starts from runs/local/tiny/export).
#   ensure_base CONFIG [BASE_WORKDIR [TRAIN_FLAG ...]]
# reads CONFIG's init.params_only; when it has the form runs/local/<base>/export or
# runs/<base>/export and experiments/<base>.py exists, it sets BASE_EXPORT=BASE_WORKDIR/export
# (BASE_WORKDIR defaults to the run directory CONFIG names) and, if that export is missing, first
# ensures the base's own start (recursively, with default workdirs and no flags), then trains
# experiments/<base>.py in BASE_WORKDIR (resuming there if an earlier attempt was stopped) with the
# TRAIN_FLAGs and exports it. Otherwise BASE_EXPORT is empty and nothing runs
# (a config from scratch, or an export given elsewhere: the trainer names a missing one).
# Runs from the repository root with the venv on PATH.
ensure_base() {
  local config="$1" base_workdir="${2:-}"
  shift $(( $# < 2 ? $# : 2 ))
  local start
  BASE_EXPORT=""
  # A config that cannot be read (missing, broken) needs no base: ccf_jax.train, run next on the
  # same file, names the problem in one line, so this read stays quiet.
  start="$(python -c 'import importlib.util, sys
spec = importlib.util.spec_from_file_location("experiment", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(module.get_config().init.params_only)' "$config" 2>/dev/null)" || return 0
  if [[ ! "$start" =~ ^(runs/(local/)?([A-Za-z0-9_]+))/export/?$ ]] \
      || [ ! -f "experiments/${BASH_REMATCH[3]}.py" ]; then
    return 0
  fi
  local base="experiments/${BASH_REMATCH[3]}.py"
  base_workdir="${base_workdir:-${BASH_REMATCH[1]}}"
  local export_dir="$base_workdir/export"
  if [ -d "$export_dir/params" ]; then
    echo "[base] $config starts from $export_dir (exists; delete it to retrain $base)"
    BASE_EXPORT="$export_dir"
    return 0
  fi
  echo "[base] $config starts from $export_dir, which is missing: training $base -> $base_workdir"
  ensure_base "$base"  # The base's own start, when it has one.
  BASE_EXPORT="$export_dir"
  python -m ccf_jax.train --config="$base" --workdir="$base_workdir" "$@"
  python -m ccf_jax.export --workdir="$base_workdir" --out="$BASE_EXPORT" --overwrite
}
