"""Custom operators that plain PyTorch lacks on some hardware, shared by training and inference."""
