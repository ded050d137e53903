"""medtta: test-time adaptation of medical image segmentation models across hospital sites."""

__version__ = "0.1.0"
