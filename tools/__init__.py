"""Development tools run from a checkout (not installed with the package): ``python -m tools.aot``
(ahead-of-time compile report of the Triton kernels), ``python -m tools.gpu_check`` (tests and
benchmarks on a GPU machine) and ``python -m tools.cuda_report`` (registers and spills of the CUDA
kernels)."""
