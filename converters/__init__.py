"""Checkpoint and data converters: FP8 -> BF16 safetensors, HF <-> Megatron-Core torch_dist, MATH parquet."""
