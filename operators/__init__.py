"""The job's operators, one module per pipeline stage.

Before any of them loads numpy: one BLAS thread (personalize.flink.single_threaded_blas; a
Python worker that a cluster's TaskManager starts has not run it)."""

import os as _os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_name, "1")
