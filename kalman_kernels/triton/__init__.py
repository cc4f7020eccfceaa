"""Triton kernels of the ``triton`` backend (``kalman_kernels/backends/triton_backend.py``).

* ``kk_math``: the per-element math, function for function ``csrc/kk_math.h``;
* ``dense``: S and the fused update of dense blocks;
* ``kron``: S and the fused update of sample-grouped Kronecker blocks (GEMMs against the
  pairwise products of the inputs);
* ``multi_tensor``: the loss-observation step over lists of tensors (a chunked tensor-list
  launcher) and the elementwise update of the distributed step.

The modules import ``triton``; under ``TRITON_INTERPRET=1`` (set before they are imported)
the kernels run on CPU tensors through Triton's interpreter, a test tool.
"""
