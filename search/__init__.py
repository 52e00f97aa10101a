"""Search strategies, genomes and Pareto math. Pure Python: no torch, Ray or Redis."""
