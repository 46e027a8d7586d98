"""The paper's algorithms as plain loops over the kernels and a model callable."""
