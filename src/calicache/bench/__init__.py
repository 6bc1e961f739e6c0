"""The bench: every method and its peers at matched compute, scored with `calicache.metrics`.

- runs.py: run one configuration (timed, MACs, peak RSS) and score results through metrics/
- peers.py: other libraries' caches (cache-dit, diffusers hooks) on the same model
- grid.py: which configurations to run (and the factor / GOC files they need), and running them
- report.py: tables, winners per MACs level, bench.md / bench.json / images
- plot.py: the quality-vs-MACs plot (matplotlib, the `plot` extra)
"""
