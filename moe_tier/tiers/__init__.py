"""Expert tiers for the GPU engine: slot table (slots.py), pinned warm arena (warm.py), O_DIRECT cold reader
(cold.py), measured link speeds and the fetch-or-compute cost model (links.py), and GpuTiers (gpu_pool.py).

slots.py, cold.py and links.py need no torch; warm.py and gpu_pool.py do (import them directly).
"""
