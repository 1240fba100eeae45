"""One run: its configuration, the step (eager or a captured graph), the optimizers, the solo
and array loops, what a worker keeps warm, checkpoints written off the training thread, stopping
on signals, and the results store each epoch is committed to.

May import fastres.study, fastres.kernels and fastres.loaders; never the grid or the report.
config, records and signals import no torch (the grid plans before the training stack loads).
"""
