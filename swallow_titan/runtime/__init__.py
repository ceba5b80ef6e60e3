"""Process utilities: what runs under every command, whatever the model.

- ``seams``: every torchtitan/torch private name we touch, checked at start-up, and device selection.
- ``device``: CPU as a torchtitan device, GPU counts, the CPU memory shims.
- ``ranks``: this process's rank and world size, read once.
- ``preemption``: SIGTERM/SIGUSR1 turned into a checkpoint-then-exit request.
"""
