"""The GPU tools: gpu/check.sh (the prepared check), report.py, benchmark.py, trainer_memory.py."""
