"""The embedded synthetic phantoms, one per dataset, each in its exact Kaggle layout (``make data``)."""
