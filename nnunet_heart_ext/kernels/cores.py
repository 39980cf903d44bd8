"""How many CPU cores this process may use: the one count the kernels' thread pools start from.

`usable_cores()` is the size of the process's CPU affinity mask where the OS has one (Linux:
`taskset`, cgroups' cpusets, Slurm's `--cpus-per-task` all shrink it), else `os.cpu_count()`.
The worker-aware count of nnU-Net's pools (`cores // nnUNet_def_n_proc` inside a worker) is built
on it in nnunet_heart_ext/nnunet/resampling.py (`numba_threads`).
"""
import os


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
