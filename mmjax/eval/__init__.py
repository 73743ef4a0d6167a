"""The papers' in-context evaluations (``python -m mmjax.eval NAME``).

:mod:`mmjax.eval.icll`: in-context language learning on random automata (the v1 paper's
figure 9): the data, the oracle and in-context n-gram predictors, the metrics.
"""
