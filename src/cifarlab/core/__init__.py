"""What every stage uses: one-line errors, the atomic writer, the run directory, checkpoints,
the measured runtime decisions (device, threads, precision), the logger and progress bars."""
