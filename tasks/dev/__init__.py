"""Development helpers (not needed in production): synthetic catalogue, bad inputs, demo, local stack."""
