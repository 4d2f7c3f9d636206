"""The engine: pipeline config, the driver (stage by stage, on the Ray driver), the workers (one part per Ray task
or actor call), the run dir's store and the status read from it."""
