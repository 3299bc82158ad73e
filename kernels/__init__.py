"""FP8 block (de)quantisation kernels: Triton on GPU or under the interpreter, an exact torch path on CPU."""
