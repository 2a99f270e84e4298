"""What sits closest to the hardware, shared by training and inference: device and dtype names (device.py)
and custom operators that plain PyTorch lacks on some CPUs (bf16_cpu.py), host memory settings that must
precede loading torch (host_memory.py)."""
