"""The training engine: the config, the reference trainer and its parts (fitting, checkpoints,
evaluation, the run folder and its log), and the checks a command runs before its first run.

It uses the contract and the library (balancers, models, data) and nothing above it.
"""
