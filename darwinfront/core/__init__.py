"""The shared core: the job spec, its status machine, the Redis key schema and store, settings and errors.

The HTTP edge (`service/`), the workers, the search and the CLI all import it; it imports none of them, nor torch
or Ray.
"""
