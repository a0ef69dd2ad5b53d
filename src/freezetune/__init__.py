"""freezetune: fine-tune torchvision ResNets with chosen layers frozen, and measure what it buys."""

__version__ = "0.1.0"
