"""A staged ensemble pipeline for Kaggle medical image segmentation, one dataset plug-in per task.

Group-disjoint folds, a crop detector, an empty-slice classifier, 2.5D and 3D segmenters trained by
one engine, and an ensemble whose blend and post-processing are tuned on out-of-fold predictions
with the dataset's own metric and written in its submission format. The datasets are plug-ins
(:mod:`pipeline.datasets`: UW-Madison GI Tract, LGG brain MRI, Ultrasound Nerve, or one of yours);
the rest of the package never names one.

Importing this package does nothing: no threads, seeds, environment or I/O. Stages call
:func:`pipeline.runtime.configure_runtime` once before any work.
"""
