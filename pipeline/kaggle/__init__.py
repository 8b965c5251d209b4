"""kaggle subpackage of the pipeline library."""
