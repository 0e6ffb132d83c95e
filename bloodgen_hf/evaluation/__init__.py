"""Evaluation: feature extractors, metrics, the standard protocol, model comparison and the augmentation study.

features.py    Inception (clean-fid) and BloodNet extractors behind one interface
metrics.py     FD, KID, IS, precision/recall, density/coverage, 1-NN test, memorization, classification
cache.py       real-feature cache keyed by dataset, size, split and extractor weights
protocol.py    runs x (n real vs n generated), real-vs-real floor, per-class values
report.py      results.json / eval_results.json / markdown tables / charts
runner.py      what evaluate and compare share
compare.py     several models -> one report folder
augment_study.py   real / real+synthetic / synthetic classifiers at several real-data sizes
bloodnet.py, bloodnet_train.py   the domain classifier and its TrainTask
"""
