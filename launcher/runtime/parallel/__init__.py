"""Parallelism: the process group, and one module per backend: native.py (FSDP2, DDP, one process)
and zero.py (DeepSpeed ZeRO, its JIT ops in zero_ops.py); backends.py builds the model and optimizer
for the plan's backend and gives its checkpoint hooks."""
