"""What ``fastmlp bench`` measures: the epoch workloads the benchmarks share (``epochs``)
and the shape grid against eager PyTorch (``grid``).

Like the workflow, importable where the compiled extension cannot load; the models are
built inside the functions that measure them.
"""
