"""Custom attention operators; each lives in its own folder next to its PyTorch reference."""
