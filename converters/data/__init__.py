"""Training data: MATH-lighteval -> verl parquet (`convert math-lighteval`)."""
