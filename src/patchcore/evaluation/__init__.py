"""The MVTec AD protocol, datasets, metrics and benchmarks, on top of the estimator."""
