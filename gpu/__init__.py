"""The GPU tools: gpu/check.sh (the prepared check), trainer_run.py (one trainer stage of it), report.py."""
