"""One of two processes training a stack under ``jax.distributed`` (run by tests/test_stack_sharding.py).

Usage: python tests/_stack_worker.py OUT_DIR PORT PROCESS_ID
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _stack_case import stack_case  # noqa: E402


def main() -> None:
    out_dir, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # Before anything starts the XLA backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    out = stack_case(run_dir=os.path.join(out_dir, "run"))
    leaves = [np.asarray(x) for x in jax.tree.leaves(out.model)]
    np.savez(os.path.join(out_dir, f"result_{pid}.npz"), *leaves,
             loss=np.asarray([r["loss"] for r in out.history if "loss" in r]))
    print("done", flush=True)


if __name__ == "__main__":
    main()
