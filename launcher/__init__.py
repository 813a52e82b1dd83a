"""The composition root: builds the App and the adapters of the configured platforms and runs
them (`python -m launcher [run|console|check]`). It sits outside `bot/` so that the core never
imports `adapters/`."""
