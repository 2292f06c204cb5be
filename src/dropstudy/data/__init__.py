"""The datasets: regression points and CIFAR-10 (files, cache, splits), on one device."""
