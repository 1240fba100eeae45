"""The grid, the main job (`python -m fastres.grid`): the plan (torch-free), running its cells
locally or on Ray, the live display and the time estimate.

The top room: may import every other (fastres.report for the TensorBoard files it keeps
current); nothing imports it.
"""
