"""atlasflow.train.tasks: everything downstream of a checkpoint.

``pretrained.py`` turns a checkpoint into an encoder plus the tokenization of any input (its vocabulary,
its gene medians, its metadata tokens); on top of it ``embed.py`` (embeddings of a store, a query or an
.h5ad), ``finetune*.py`` (a classifier head, full or frozen, streamed or in memory), ``evaluate.py`` with
``baselines.py`` / ``eval_metrics.py`` / ``eval_tables.py`` / ``eval_plots.py`` (the evaluation protocol:
PCA and logistic-regression baselines, a random-init control, seeds), and ``cli.py`` (``atlasflow
query | embed | finetune | eval``).
"""
