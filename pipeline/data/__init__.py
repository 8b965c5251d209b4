"""data subpackage of the pipeline library."""
