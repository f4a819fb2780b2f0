"""The math of each method, once: pure functions shared by the federated strategies
(``fedens.strategies``) and the gossip rules (``fedens.decentralized.rules``), and, for the ADMM
family, each algorithm's client-side term beside its server step (one file per algorithm, its
``Options`` and state keys in it). Importing the package registers every client term in
``fedens.objectives.OBJECTIVES``; the ClientApp builds them with ``objective_from_config``.
"""

from fedens.algorithms import fedadmm, feddyn, fedlap, fedlap_cov, fedprox, ivon_admm  # noqa: F401  (registration)
from fedens.objectives import objective_from_config  # noqa: F401
