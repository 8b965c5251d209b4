"""Staged ensemble pipeline for Kaggle medical image segmentation (UW-Madison GI Tract).

Importing this package does nothing: no threads, seeds, environment or I/O. Stages call
:func:`pipeline.runtime.configure_runtime` once before any work.
"""
