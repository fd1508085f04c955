"""xmerge: distill, register and merge hybrid xLSTM experts."""
