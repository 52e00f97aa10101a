"""KVTuner-style mixed-precision KV cache: quantizer (`quant`), transformers cache (`cache`), sensitivity (`profile`).

`workers.kv.cache` checks the installed transformers against `TRANSFORMERS_RANGE` when imported.
"""
