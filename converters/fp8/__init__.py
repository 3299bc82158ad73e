"""FP8 -> BF16 safetensors (`convert fp8-bf16`): plan, per-shard cast, the run over workers, verify."""
