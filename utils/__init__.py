"""Standard-library-level helpers: checkpoint files, process-group helpers, argument checks, dataset
facts."""
