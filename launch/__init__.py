"""Planning and running verl GRPO: parallelism plans, verl overrides, the Ray cluster, the demo."""
