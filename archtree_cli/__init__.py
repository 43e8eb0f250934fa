"""The archtree command line and its settings."""
