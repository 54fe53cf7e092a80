"""The experiments, one module per study; ``python -m model.experiment NAME`` runs one.

* :mod:`~model.experiments.common` — protocols, worlds, the run cache and pool, statistics;
* :mod:`~model.experiments.tables` — the paper's Tables 2 and 3 on the medium world;
* :mod:`~model.experiments.history` — AUC against history length;
* :mod:`~model.experiments.movielens` — the Table 2 models on MovieLens 100K;
* :mod:`~model.experiments.fair` — published baselines and fair-information variants against
  IFA on worlds it was not tuned on and on MovieLens, with per-request metrics and bootstrap
  intervals.
"""
