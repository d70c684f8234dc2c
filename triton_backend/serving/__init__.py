"""The serving layer: the process that runs Triton and PyTriton, its link to the engine, control and metrics.

Nothing here imports torch: the serving process and Triton's Python-backend models import these modules.
"""
