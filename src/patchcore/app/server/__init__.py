"""HTTP serving: several fitted models by name, batched scoring, a review store for inspector feedback,
incremental updates swapped in live, and an inspection page (docs/SERVER.md).

Only this package (and the CLI) import the web framework; the estimator knows nothing about HTTP.
"""
