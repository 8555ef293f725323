"""What every stage uses: one-line errors, the atomic writer, checkpoint files, the measured
runtime decisions (device, threads, precision), the logger and progress bars."""
