"""Smoke test of a multi-process JAX job: `jax.distributed` + cross-process collectives.

Runs on every process of a job, exactly like `ccf_jax.train` would: it calls
`jax.distributed.initialize()` (no arguments unless JAX_NUM_PROCESSES / JAX_PROCESS_ID are set, see
below), builds one mesh over all global devices and checks, against numpy:
  * a psum over every device (shard_map),
  * a jitted matmul whose rows are sharded over all devices (no communication),
  * a jitted matmul whose contraction dimension is sharded (needs a cross-process all-reduce),
  * process_allgather of the sharded result.
Prints one JSON line per process (`CHECK_DISTRIBUTED {...}`) and exits non-zero on a mismatch.

Use it before booking a long run:
  launch/local_multiprocess.sh --entry launch/check_distributed.py 2        # 2 CPU processes here
  launch/tpu_pod.sh ... --entry launch/check_distributed.py --              # every TPU worker
  launch/slurm_submit.sh ... --entry launch/check_distributed.py --         # every SLURM node

Flags: --explicit passes num_processes/process_id from JAX_NUM_PROCESSES/JAX_PROCESS_ID to
initialize() (jax 0.10.2 reads only JAX_COORDINATOR_ADDRESS itself); --no-distributed skips
initialize() (single-process sanity run).
"""

import json
import os
import sys
import time
import traceback


def main(argv):
  explicit = '--explicit' in argv
  distributed = '--no-distributed' not in argv
  t0 = time.time()
  import jax
  if distributed:
    kwargs = {}
    if explicit:
      kwargs = dict(num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                    process_id=int(os.environ['JAX_PROCESS_ID']))
    jax.distributed.initialize(**kwargs)
  import numpy as np
  import jax.numpy as jnp
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  n, pidx, pcount = jax.device_count(), jax.process_index(), jax.process_count()
  expected = os.environ.get('JAX_NUM_PROCESSES')
  if expected is not None and distributed and int(expected) != pcount:
    raise SystemExit(f'process_count() is {pcount}, expected JAX_NUM_PROCESSES={expected}')
  mesh = jax.make_mesh((n,), ('d',), axis_types=(AxisType.Auto,), devices=jax.devices())  # GSPMD, as ccf_jax

  # 1. psum over all devices of every device's position in the mesh.
  ids = jax.make_array_from_callback((n,), NamedSharding(mesh, P('d')),
                                     lambda idx: np.arange(n, dtype=np.float32)[idx])
  psum = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, 'd'), mesh=mesh, in_specs=P('d'),
                               out_specs=P()))(ids)
  psum_val = float(np.asarray(psum.addressable_data(0))[0])
  ok_psum = psum_val == n * (n - 1) / 2

  # 2./3. Sharded matmuls against numpy (same data on every process, float32, exact-ish ints).
  rng = np.random.default_rng(0)
  x_np = rng.integers(-4, 5, size=(4 * n, 8 * n)).astype(np.float32)
  w_np = rng.integers(-4, 5, size=(8 * n, 16)).astype(np.float32)
  ref = x_np @ w_np

  def put(a, spec):
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda idx: a[idx])

  rows = jax.jit(jnp.matmul, out_shardings=NamedSharding(mesh, P('d')))(put(x_np, P('d')),
                                                                       put(w_np, P()))
  contr = jax.jit(jnp.matmul, out_shardings=NamedSharding(mesh, P()))(put(x_np, P(None, 'd')),
                                                                     put(w_np, P('d')))
  rows_all = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
  ok_rows = bool(np.array_equal(rows_all, ref))
  ok_contr = bool(np.array_equal(np.asarray(contr.addressable_data(0)), ref))
  multihost_utils.sync_global_devices('check_distributed_done')

  result = dict(process_index=pidx, process_count=pcount, local_devices=jax.local_device_count(),
                global_devices=n, platform=jax.devices()[0].platform,
                # What jax.distributed made of local_device_ids (JAX_LOCAL_DEVICE_IDS / SLURM_LOCALID).
                cuda_visible_devices=jax.config.values.get('jax_cuda_visible_devices'), psum=psum_val,
                ok_psum=ok_psum, ok_rows_matmul=ok_rows, ok_contraction_matmul=ok_contr,
                seconds=round(time.time() - t0, 2))
  # One write call: print() writes the text and the newline separately, and on an unbuffered
  # stream gloo's own C++ logging (same file in the launcher's log) can land between the two.
  sys.stdout.write('CHECK_DISTRIBUTED ' + json.dumps(result) + '\n')
  sys.stdout.flush()
  return 0 if (ok_psum and ok_rows and ok_contr) else 1


if __name__ == '__main__':
  try:
    code = main(sys.argv[1:])
  except BaseException:  # pylint: disable=broad-except
    # A plain raise would leave this process waiting in jax.distributed's shutdown barrier (atexit)
    # for the others, for up to shutdown_timeout_seconds (300 s): report and leave at once, so the
    # launcher sees the failure and stops the rest.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  sys.exit(code)
