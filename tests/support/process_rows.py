"""Run by ``tests/test_distributed.py`` as two processes (``python -m tests.support.process_rows PORT ID``): a batch
split over a mesh whose device order interleaves the processes, as a TPU slice's may, goes to the devices and back.
Prints one JSON line of what this process saw."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from medix_jax import parallel

if __name__ == "__main__":
    port, process_id = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=60)
    by_process = [[d for d in jax.devices() if d.process_index == p] for p in range(2)]
    devices = [d for pair in zip(*by_process, strict=True) for d in pair]  # p0, p1, p0, p1, ...
    mesh = parallel.make_mesh({"fsdp": 8}, devices)
    rows = parallel.process_rows(mesh, 16)
    local = np.stack([rows, 10 * rows], 1).astype(np.float32)  # row r holds (r, 10 r)
    batch = parallel.batch_array(local, mesh)
    in_place = bool(jax.jit(lambda x: (x[:, 0] == jnp.arange(16)).all())(batch))  # global row r holds r
    back = parallel.local_rows(jax.jit(lambda x: 2 * x)(batch))
    try:
        parallel.process_rows(parallel.make_mesh({"tensor": 8}), 16)  # tensor across processes: no rows of its own
        error = ""
    except ValueError as e:
        error = str(e)
    round_trip = bool(np.array_equal(back, 2 * local))
    seen = {"rows": rows.tolist(), "in_place": in_place, "round_trip": round_trip, "error": error}
    print(json.dumps(seen), flush=True)
