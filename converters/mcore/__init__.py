"""Megatron-Core torch_dist: HF config/name tables, the writer (`convert hf-mcore`) and reader (`convert mcore-hf`), TP chunk layout, load-read cost, and the load check."""
