"""The math of each method as pure numpy functions, shared by the federated strategies
(``strategies/``) and the gossip rules (``fedens.decentralized.rules``)."""
