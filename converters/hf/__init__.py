"""HF checkpoints: lazy safetensors shard I/O, the index, and an FP8-aware reader of a model directory."""
