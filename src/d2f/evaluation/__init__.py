"""Evaluation on MNIST: a small classifier d2f trains and ships, and FID / precision / recall / accuracy in
its feature space."""
