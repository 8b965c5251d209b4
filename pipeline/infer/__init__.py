"""infer subpackage of the pipeline library."""
