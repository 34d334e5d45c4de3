"""The training loop and what it needs: step, state, validation, data loaders, runtime, logging,
config checks."""
