"""The trainer's components, one file per training concern (torchtitan's ``components/``).

- ``loss``: torchtitan's summed cross-entropy or the fused output-layer loss, with z-loss.
- ``metrics``: TensorBoard, the run log (``metrics.jsonl``) and the progress line.
- ``validation``: per-domain validation sets through torchtitan's validator.
- ``guard``: what happens on a non-finite loss or gradient norm.
- ``profiling``: torchtitan's profiler made CPU-aware.
- ``preflight``: every check a config must pass before a run starts.
- ``start_rule``: where a run starts (its own checkpoint, a DCP or HF starting point).
- ``final_export``: the end-of-run Hugging Face export.
"""
