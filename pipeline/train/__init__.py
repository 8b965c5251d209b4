"""train subpackage of the pipeline library."""
