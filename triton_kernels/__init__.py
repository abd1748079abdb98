"""sparse-t5's Triton kernels (installed as `sparse_t5_triton`, so as not to clash with the
`triton_kernels` package that Triton publishes). They are the CUDA bodies of the sparse_t5:: ops;
sparse_t5.ops.triton_dispatch registers them.

  csr_linear.py     CSR forward, dX (atomics), dvalues (SDDMM)
  semi24_linear.py  2:4 forward and dX (decompressed tiles + tl.dot), dvalues (CSR SDDMM)
"""
