"""The report (`python -m fastres.report`): Tables 3 and 4 and Figures 5-8 from a results store,
as Markdown, CSV, JSON, one HTML page or TensorBoard event files. Read-only over the store.

May import fastres.study and fastres.run (the store's reader); never the grid, so a report starts
without the trainer.
"""
