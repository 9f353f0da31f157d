"""xLSTM 7B in PyTorch + Triton."""
