"""models subpackage of the pipeline library."""
