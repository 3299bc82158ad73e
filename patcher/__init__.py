"""Source and config patches: Megatron's MLA down projections, DeepSeek-V3's config.json."""
