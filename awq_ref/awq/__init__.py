"""AWQ: activation-aware weight quantization (Lin et al. 2023), step by step.

capture -> search scales -> apply scales -> search clip -> apply clip, block by block;
`pipeline.run_awq` runs the steps, `apply.apply_awq` re-applies a saved `AwqResult`.
"""
