"""Evaluation as a library: tensors (or a frozen model and a dataset) in, numbers out.

``config.py`` the ``probe`` section; ``features.py`` pooled features of a frozen backbone and
flattened pixels; ``linear.py`` the converged logistic regression (the linear probe's solver);
``knn.py`` the weighted k-NN vote; ``probe.py`` both on given features; ``classification.py``
top-1 / top-5 of a classifier over a loader; ``diagnostics.py`` the cross-image diagnostics of
a pretraining model; ``segmentation.py`` the confusion matrix, mIoU / mAcc / aAcc and
whole / sliding-window / multi-scale / flipped inference of a segmenter. Nothing here writes
files or knows about runs (``tasks/`` does).
"""
