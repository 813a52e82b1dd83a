"""InternLM chat bot: the platform-neutral core."""
