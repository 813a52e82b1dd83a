"""Platform adapters: the only code that imports telegram or discord."""
