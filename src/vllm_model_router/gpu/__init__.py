"""GPUs: the NVML probe behind an interface (probe), memory needs and budgets (memory), and the
monitor of what other processes hold and of memory coming back after a stop (watch)."""
