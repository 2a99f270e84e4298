"""What sits closest to the hardware, shared by training and inference: device and dtype names (device.py)
and custom operators that plain PyTorch lacks on some CPUs (bf16_cpu.py), and the CPU allocator's
setting for training (host_memory.py)."""
