"""AWQ: activation-aware weight quantization (Lin et al. 2023), step by step.

capture -> search scales -> apply scales -> search clip -> apply clip, block by block;
`pipeline.search_awq` runs the steps (`search_block` for one block) and returns an `AwqResult`;
`apply.apply_awq` folds a result into a model; `pipeline.run_awq` does both.
"""
