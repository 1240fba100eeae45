"""Data from disk to the device (installed as fastres.loaders): the FFCV stream loader, whole
splits resident on the device, each epoch's order from (seed, epoch), and the device-side crop,
flip and normalise (eager, or the Triton kernel of fastres.kernels.augment).

May import fastres.study and fastres.kernels only.
"""
