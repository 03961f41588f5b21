"""raysft jobs: Ray job entrypoints and the pure data/training logic they run."""
