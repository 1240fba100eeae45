"""fastres: a fast, faithful trainer for the constrained-ResNet CIFAR-10 study."""

__version__ = "0.1.0"
