"""The supernet model, its caches and (later) the generation engine and worker deployment. The only torch layer."""
