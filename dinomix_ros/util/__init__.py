"""Small helpers shared by the core: atomic file writes, progress bars, time stamps."""
